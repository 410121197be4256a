"""Fréchet Inception Distance with torch-fidelity's Inception v3 ("inception-v3-compat", 2048
pool features, the network of the original TensorFlow FID), fed batch by batch."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from .weights import cached_weights

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_FILE)


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``path`` if given, else the torch hub cache (downloaded there
    if possible). Raises a ``FileNotFoundError`` that says which file to put where."""
    if path is None:
        return cached_weights(INCEPTION_URL, "FID (torch-fidelity's Inception v3)",
                              "or pass its path with --inception-weights PATH (or skip FID with "
                              "--no-fid)")
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--inception-weights {path}: no such file. It must be torch-fidelity's "
            f"{INCEPTION_FILE} ({INCEPTION_URL}); or skip FID with --no-fid.")
    return Path(path)


@contextmanager
def _state_dict_source(state_dict: dict):
    # torch-fidelity would unpickle a user-given file with weights_only=False; we load it safely
    # ourselves and hand the tensors over in place of its download.
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state_dict):
        yield fe.FeatureExtractorInceptionV3


def load_inception(weights: str | os.PathLike | None = None,
                   device: torch.device | str = "cpu") -> torch.nn.Module:
    path = find_inception_weights(weights)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    with _state_dict_source(state_dict) as cls:
        model = cls("inception-v3-compat", ["2048"])
    return model.eval().to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float B×C×H×W → uint8 B×3×H×W (grey expanded to 3 channels)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """2048-d pool features (float64, on the CPU) of [-1, 1] images."""
    device = next(model.parameters()).device
    return model(to_uint8(images).to(device))[0].double().cpu()


def frechet_distance(features_a: torch.Tensor | np.ndarray,
                     features_b: torch.Tensor | np.ndarray) -> float:
    """FID between two feature sets (N×D each), via torch-fidelity's statistics."""
    from torch_fidelity.metric_fid import (KEY_METRIC_FID, fid_features_to_statistics,
                                           fid_statistics_to_metric)
    stats = [fid_features_to_statistics(torch.as_tensor(f)) for f in (features_a, features_b)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])
