"""The papers' small-image data as in-memory tensors: scikit-learn's digits and the MNIST IDX
files, each with a fixed validation split (the last images)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from engine.data import digits


def load_digits(resolution: int = 16, validation: int = 297) -> dict[str, torch.Tensor]:
    """scikit-learn's digits, bilinearly up-sampled to ``resolution``, scaled to [-1, 1], as
    N×1×R×R float tensors with labels. The last ``validation`` images form the fixed validation
    split. Returns ``{"train", "train_labels", "val", "val_labels"}``."""
    images, labels = digits(resolution)
    if not 0 < validation < len(images):
        raise ValueError(f"validation must be between 1 and {len(images) - 1}, got {validation}")
    cut = len(images) - validation
    return {
        "train": images[:cut],
        "train_labels": labels[:cut],
        "val": images[cut:],
        "val_labels": labels[cut:],
    }


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An MNIST-style IDX file (optionally gzipped): big-endian magic (0, 0, type, ndim), the
    dimensions as big-endian uint32, then the data. Only unsigned-byte data (type 0x08)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (MNIST format)")
    ndim = raw[3]
    shape = tuple(np.frombuffer(raw, ">u4", count=ndim, offset=4).tolist())
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist_idx(
    images: str | os.PathLike, labels: str | os.PathLike, validation: int = 1000
) -> dict[str, torch.Tensor]:
    """MNIST IDX files as N×1×28×28 floats in [-1, 1] with labels; the last ``validation``
    images form the fixed validation split (no shuffling). Returns
    ``{"train", "train_labels", "val", "val_labels"}`` like :func:`load_digits`."""
    for path in (images, labels):
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"MNIST file {str(path)!r} not found: put the IDX files "
                "(e.g. t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) "
                "there or point to their directory"
            )
    x = torch.from_numpy(read_idx(images).copy()).float().unsqueeze(1) / 127.5 - 1
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} {len(y)} labels")
    if not 0 < validation < len(x):
        raise ValueError(f"validation must be between 1 and {len(x) - 1}, got {validation}")
    cut = len(x) - validation
    return {"train": x[:cut], "train_labels": y[:cut], "val": x[cut:], "val_labels": y[cut:]}
