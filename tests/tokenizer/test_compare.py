import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.launch import ROOT
from tokenizer.experiments import compare
from tokenizer.experiments.compare import evaluate, format_table, train, train_and_evaluate
from tokenizer.experiments.mnist import load_digits
from tokenizer.experiments.vqvae import SmallVQVAE
from tokenizer.metrics import CodebookUsage, psnr
from tokenizer.quantizers import build_quantizer


def test_digits_are_real_and_split():
    data = load_digits(16, validation=297)
    assert data["train"].shape == (1500, 1, 16, 16)
    assert data["val"].shape == (297, 1, 16, 16)
    assert data["train"].min() >= -1 and data["train"].max() <= 1
    assert set(data["train_labels"].tolist()) == set(range(10))
    assert data["train"].std() > 0.3  # real strokes, not a constant image


def test_psnr_and_usage_by_hand():
    target = torch.zeros(2, 1, 4, 4)  # 0.5 grey in [0, 1] pixels
    recon = torch.full((2, 1, 4, 4), 0.2)  # 0.6: error 0.1, MSE 0.01 → 20 dB
    assert torch.isclose(psnr(recon, target), torch.tensor(20.0))
    meter = CodebookUsage(4)
    meter.update(torch.tensor([3, 0, 1, 0]))
    meter.update(torch.tensor([1, 0, 3, 0]))
    assert meter.usage == 0.5
    assert abs(meter.perplexity - 2.0) < 1e-5


class _CodeInFirstPixel(torch.nn.Module):
    """Reconstructs its input; each image's code is its first pixel. Records its modes."""

    def __init__(self):
        super().__init__()
        self.quantizer, self.modes = SimpleNamespace(num_codes=4), []

    def forward(self, x):
        self.modes.append(self.training)
        counts = torch.bincount(x[:, 0, 0, 0].long(), minlength=4)
        return x, SimpleNamespace(counts=counts)


def test_usage_is_counted_over_the_whole_set_in_eval_mode():
    # codes 0, 0 | 1, 3 | 3 in batches of two: accumulated counts (2, 1, 0, 2), as the official
    # test.py (all encodings concatenated); the last batch alone would give usage 1/4
    images = torch.zeros(5, 1, 4, 4)
    images[:, 0, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 3.0, 3.0])
    model = _CodeInFirstPixel().train()
    scores, recon = evaluate(model, images, chunk=2)
    assert model.modes == [False, False, False]  # three batches, all in eval mode
    assert scores["usage"] == 0.75
    p = torch.tensor([0.4, 0.2, 0.4])
    assert scores["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert scores["mse"] == 0 and recon.shape == images.shape


def test_training_divides_the_mse_by_the_given_variance(monkeypatch):
    seen = []

    def spy(recon, images, quantizer_loss, variance):
        seen.append(variance)
        return compare.F.mse_loss(recon, images) / variance + quantizer_loss

    monkeypatch.setattr(compare, "vqvae_loss", spy)
    model = SmallVQVAE(build_quantizer("vq", num_codes=8, code_dim=4), hidden=8, embed_dim=4)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    train(model, images, steps=2, batch_size=3, lr=1e-3, variance=0.125)
    train(model, images, steps=1, batch_size=3, lr=1e-3)  # default: the variance of images
    assert seen[:2] == [0.125, 0.125] and seen[2] == images.var()


def test_training_improves_reconstruction():
    data = load_digits(16)
    data = {"train": data["train"][:256], "val": data["val"][:64]}
    before = train_and_evaluate(
        "looc",
        "looc",
        dict(num_codes=16, code_dim=4),
        data,
        steps=0,
        batch_size=32,
        hidden=16,
        embed_dim=16,
    )
    after = train_and_evaluate(
        "looc",
        "looc",
        dict(num_codes=16, code_dim=4),
        data,
        steps=80,
        lr=3e-3,
        batch_size=32,
        hidden=16,
        embed_dim=16,
    )
    assert after.psnr > before.psnr + 3
    assert 0 < after.usage <= 1 and 1 <= after.perplexity <= 16
    assert "| looc |" in format_table([after])


def test_comparison_script_runs():
    done = subprocess.run(
        [sys.executable, "scripts/compare_quantizers.py", "--steps", "2", "--batch-size", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for name in compare.DEFAULT_SETTINGS:
        assert f"| {name} |" in done.stdout
