"""Datasets. For now the embedded default: scikit-learn's 1,797 real 8×8 handwritten digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits(resolution: int = 16, validation: int = 297) -> dict[str, torch.Tensor]:
    """scikit-learn's digits, bilinearly up-sampled to ``resolution``, scaled to [-1, 1], as
    N×1×R×R float tensors with labels. The last ``validation`` images form the fixed validation
    split. Returns ``{"train", "train_labels", "val", "val_labels"}``."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear",
                           align_corners=False).clamp(0, 1) * 2 - 1
    labels = torch.tensor(digits.target, dtype=torch.long)
    if not 0 < validation < len(images):
        raise ValueError(f"validation must be between 1 and {len(images) - 1}, got {validation}")
    cut = len(images) - validation
    return {"train": images[:cut], "train_labels": labels[:cut],
            "val": images[cut:], "val_labels": labels[cut:]}
