import gzip
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.launch import ROOT
from tokenizer.experiments.mnist import read_idx
from tokenizer.experiments.reproduce import (
    MNIST_FILES,
    OFFICIAL,
    PAPERS,
    TABLES,
    Row,
    RunConfig,
    _plot_usage_pil,
    format_tables,
    load_mnist,
    select_tables,
)
from tokenizer.quantizers import build_quantizer

MNIST = Path("/work/shared/data/mnist")
needs_mnist = pytest.mark.skipif(
    not (MNIST / MNIST_FILES[0]).is_file(), reason=f"MNIST test set not in {MNIST}"
)
COLUMNS = ("usage", "perplexity", "PSNR (dB)", "SSIM", "L1", "LPIPS", "rFID", "train time")


def test_read_idx_by_hand(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], ">u4").tobytes()
    path.write_bytes(gzip.compress(header + data.tobytes()))
    assert np.array_equal(read_idx(path), data)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(bad)


@needs_mnist
def test_mnist_split_is_fixed_and_disjoint():
    a, b = load_mnist(MNIST), load_mnist(MNIST)
    assert a["train"].shape == (9000, 1, 28, 28) and a["val"].shape == (1000, 1, 28, 28)
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic
    raw = torch.from_numpy(read_idx(MNIST / MNIST_FILES[0]).copy()).float() / 127.5 - 1
    # first 9,000 train, last 1,000 validate: together exactly the 10,000 images, no overlap
    assert torch.equal(torch.cat([a["train"], a["val"]]).squeeze(1), raw)
    assert a["train"].min() == -1 and a["train"].max() == 1
    assert set(a["val_labels"].tolist()) == set(range(10))


def test_missing_mnist_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)


def test_bad_table_name_is_refused(monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown table 'bogus'; choose one of"):
        select_tables("bogus")
    assert select_tables("all") == list(TABLES)
    # the script, in this process (a fresh one would spend its time importing torch)
    monkeypatch.setattr(sys, "argv", ["reproduce_tables.py", "--table", "bogus"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "scripts" / "reproduce_tables.py"), run_name="__main__")
    assert exited.value.code == 2
    assert "unknown table 'bogus'; choose one of ['main', 'looc_dstar'" in capsys.readouterr().err


def test_every_reproduced_row_builds_and_has_a_paper_row():
    assert len(TABLES["cvq_anchors"]) == 8 and len(TABLES["looc_dstar"]) == 5
    for rows in TABLES.values():
        assert set(rows) <= set(PAPERS)
        for kind, options in rows.values():  # options the quantizers accept
            assert build_quantizer(kind, **options).num_codes == options["num_codes"]


def test_table_marks_skipped_metrics_and_draws_without_matplotlib(tmp_path):
    metrics = dict(usage=0.5, perplexity=3.0, psnr=20.0, ssim=0.8, l1=0.05, seconds=1.0)
    rows = [Row("main", "LooC 32x4", "looc", {}, metrics, [(0, 0.1), (5, 0.5)])]
    text = format_tables(rows, RunConfig(), {"lpips": "weights missing: vgg16.pth"})
    ours = "| LooC 32x4 | ours | 50.0% | 3.0 | 20.00 | 0.8000 | 0.0500 | skipped | – | 1 s |"
    paper = "| LooC 32x4 | LooC Tab. 1 | – | – | 35.15 | 0.9961 | 0.0082 | 0.0083 | 1.70 | – |"
    assert ours in text and paper in text
    assert "LPIPS: skipped (weights missing: vgg16.pth)" in text
    _plot_usage_pil(rows, tmp_path / "u.png")
    assert Image.open(tmp_path / "u.png").size == (640, 400)


@needs_mnist
@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "scripts/reproduce_tables.py",
            "--quick",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "table.md").read_text()
    assert "| row | source | " + " | ".join(COLUMNS) + " |" in table
    expected = ["VQ 1024x128", "CVQ 1024x128 (online)", "LooC 32x4"]
    for name in expected:
        assert f"| {name} | ours |" in table and f"| {name} | {PAPERS[name][0]} |" in table
    for row in OFFICIAL:
        assert "| " + " | ".join(row) + " |" in table
    for metric in ("LPIPS", "rFID"):  # tests never download: missing weights are reported
        assert f"{metric}: skipped (weights missing:" in table

    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == expected
    assert results["config"]["steps"] == 20
    for r in results["rows"]:
        for key in ("usage", "perplexity", "psnr", "ssim", "l1", "seconds"):
            assert math.isfinite(r["metrics"][key]), (r["name"], key)
        assert 0 < r["metrics"]["usage"] <= 1
        assert [step for step, _ in r["curve"]] == [0, 10, 20]

    png = tmp_path / "usage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 100
