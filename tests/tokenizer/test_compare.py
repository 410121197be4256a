import subprocess
import sys

import torch

from tests.launch import ROOT
from tokenizer.experiments.compare import format_table, train_and_evaluate
from tokenizer.experiments.mnist import load_digits
from tokenizer.metrics import CodebookUsage, psnr


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
    for name in ("VQ 256x64", "CVQ 256x64", "LooC 64x4"):
        assert f"| {name} |" in done.stdout
