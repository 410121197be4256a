"""The ``inception`` family: images/s of torch-fidelity's Inception v3 2048-d features."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.common import measure, row, skipped


def write_random_inception(path: Path) -> Path:
    """torch-fidelity's Inception v3 with random weights, saved at ``path`` (the tests' weights
    file too). Kaiming-initialised: with PyTorch's default (small) initialisation every image
    gets nearly the same features and every FID comes out ~0, which would hide broken plumbing."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(
            fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None
        ),
    ):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


def inception_weights(args) -> Path | None:
    """--inception-weights, else the torch hub cache (no download attempt), else with
    --random-inception a random-weights file in a temporary folder; None if none of these."""
    import os

    from engine.fid import INCEPTION_FILE, find_inception_weights
    from engine.weights import NO_DOWNLOAD

    if args.inception_weights:
        return Path(args.inception_weights)
    old = os.environ.get(NO_DOWNLOAD)
    os.environ[NO_DOWNLOAD] = "1"
    try:
        return find_inception_weights(None)
    except FileNotFoundError:
        pass
    finally:
        if old is None:
            del os.environ[NO_DOWNLOAD]
        else:
            os.environ[NO_DOWNLOAD] = old
    if not args.random_inception:
        return None
    return write_random_inception(Path(tempfile.mkdtemp()) / INCEPTION_FILE)


def bench_inception(args, device) -> list[dict]:
    """Inception v3 (torch-fidelity's) 2048-d features of uint8 images, images/s."""
    from engine.fid import inception_features, load_inception

    batch, side = (64, 256) if args.size == "real" else (4, 32)
    setting = f"batch {batch}, {side}px -> 299px"
    path = inception_weights(args)
    if path is None:
        return [
            skipped(
                "inception",
                "Inception v3 features",
                setting,
                "skipped: no weights (--inception-weights PATH or --random-inception)",
            )
        ]
    model = load_inception(path, device)
    images = torch.rand(batch, 3, side, side, device=device) * 2 - 1
    seconds, peak = measure(
        lambda: inception_features(model, images), device, args.steps, args.warmup
    )
    notes = "random weights" if args.random_inception and not args.inception_weights else ""
    return [
        row("inception", "Inception v3 features", setting, seconds, peak, batch, "images/s", notes)
    ]
