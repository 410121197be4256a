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
from tokenizer.experiments import reproduce
from tokenizer.experiments.compare import vqvae_loss
from tokenizer.experiments.mnist import read_idx
from tokenizer.experiments.reproduce import (
    MNIST_FILES,
    OFFICIAL,
    OFFICIAL_CPU,
    PAPERS,
    TABLES,
    Row,
    RunConfig,
    _plot_usage_pil,
    aggregate,
    format_tables,
    load_mnist,
    official_variance,
    run_row,
    select_tables,
)
from tokenizer.quantizers import QUANTIZERS, build_quantizer

MNIST = Path("/work/shared/data/mnist")
needs_mnist = pytest.mark.skipif(
    not (MNIST / MNIST_FILES[0]).is_file(), reason=f"MNIST test set not in {MNIST}"
)
COLUMNS = (
    "usage",
    "dead codes",
    "final usage",
    "perplexity",
    "PSNR (dB)",
    "SSIM",
    "L1",
    "LPIPS",
    "rFID",
    "best step",
    "train time",
)


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
    # the CVQ-VAE README's 512x64 recipe has no number in either paper (Tab. 4a/b are plots)
    unpublished = {"CVQ 512x64 (closest)", "CVQ 512x64 (probabilistic, contrastive 1)"}
    for table, rows in TABLES.items():
        if table != "field":  # the field's papers measured ImageNet only
            assert set(rows) - unpublished <= set(PAPERS)
        for kind, options in rows.values():  # options the quantizers accept
            build_quantizer(kind, **options)


def test_field_table_is_every_kind_at_two_matched_sizes():
    sizes = {}
    for kind, options in TABLES["field"].values():
        k = build_quantizer(kind, **options).num_codes
        sizes.setdefault("16k" if k > 4096 else "1k", {})[kind] = k
    assert sizes["1k"] == dict(
        vq=1024, cvq=1024, looc=256, fsq=1000, lfq=1024, simvq=1024, ibq=1024
    )
    assert sizes["16k"] == dict(vq=16384, cvq=16384, fsq=15360, lfq=16384, simvq=16384, ibq=16384)
    large = {
        n for n, (kind, o) in TABLES["field"].items() if build_quantizer(kind, **o).num_codes > 4096
    }
    assert reproduce.FIRST_SEED_ONLY == large  # one seed at ≈16k codes, all at ≈1k


def test_main_table_rows_are_the_official_settings():
    closest = dict(distance="cosine", anchor="closest", online=True, contrastive_weight=0.0)
    contrastive = {**closest, "anchor": "probabilistic", "contrastive_weight": 1.0}
    looc = {**closest, "interp_scale": 2}
    expected = {
        "VQ 1024x128": ("vq", 1024, 128, dict(distance="l2")),
        "CVQ 512x64 (closest)": ("cvq", 512, 64, closest),
        "CVQ 512x64 (probabilistic, contrastive 1)": ("cvq", 512, 64, contrastive),
        "CVQ 1024x128 (closest)": ("cvq", 1024, 128, closest),
        "CVQ 1024x128 (probabilistic, contrastive 1)": ("cvq", 1024, 128, contrastive),
        **{
            f"LooC {k}x4 ({layout}, {st})": (
                "looc",
                k,
                4,
                {**looc, "segment_layout": layout, "straight_through": st},
            )
            for k in (256, 32)
            for layout in ("channel", "unshuffle")
            for st in ("identity", "interpolated")
        },
        "LooC 256x4 (unshuffle, interpolated, no CVQ update)": (
            "looc",
            256,
            4,
            {
                **looc,
                "anchor": "none",
                "segment_layout": "unshuffle",
                "straight_through": "interpolated",
            },
        ),
    }
    assert list(TABLES["main"]) == list(expected)
    for name, (kind, num_codes, code_dim, attributes) in expected.items():
        row_kind, options = TABLES["main"][name]
        q = build_quantizer(row_kind, **options)
        assert row_kind == kind and type(q) is QUANTIZERS[kind], name
        assert (q.num_codes, q.code_dim) == (num_codes, code_dim), name
        assert {a: getattr(q, a) for a in attributes} == attributes, name


def test_reconstruction_loss_is_the_official_one():
    # [-1, 1] images whose [0, 1] pixels are 0, 0, 1, 1: variance 0.25 (the official
    # np.var(data / 255.0)); the [-1, 1] variance (what we divided by before) is 1
    images = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(4, 1, 1, 1)
    assert official_variance(images).item() == pytest.approx(0.25)
    recon = torch.zeros_like(images)  # 0.5 grey: MSE 1 on [-1, 1], 0.25 on [0, 1] pixels
    loss = vqvae_loss(recon, images, torch.tensor(0.5), official_variance(images))
    mse01 = ((recon + 1) / 2 - (images + 1) / 2).pow(2).mean()
    # the official main.py: F.mse_loss on the Normalize(0.5, 0.5) tensors / [0, 1] variance
    assert loss.item() == pytest.approx(4 * mse01.item() / 0.25 + 0.5) == 4.5


def _fake_run(monkeypatch, mse: dict[int, float], **config):
    """run_row with a fake training (validations at multiples of ``every``) and evaluation:
    at step s the validation MSE is mse[s], the PSNR s, the usage s / 100 and the
    reconstructions all s."""
    step, seen = [0], {}

    def fake_train(model, images, steps, batch_size, lr, every, callback, variance):
        seen["variance"] = variance
        for s in range(every, steps + 1, every):
            step[0] = s
            callback(s)
        step[0] = steps
        return 12.0

    def fake_evaluate(model, images):
        s = step[0]
        scores = dict(usage=s / 100, perplexity=1.0, mse=mse[s], psnr=float(s), ssim=0.5, l1=0.1)
        return scores, torch.full((len(images), 1, 28, 28), float(s))

    monkeypatch.setattr(reproduce, "train", fake_train)
    monkeypatch.setattr(reproduce, "evaluate", fake_evaluate)
    # 4 training images of pixels -1 and 1: variance 0.25 on [0, 1]
    data = {"train": torch.tensor([-1.0, 1.0]).repeat(2 * 784).view(4, 1, 28, 28)}
    data["val"] = torch.zeros(3, 1, 28, 28)
    scorers = {"lpips": lambda recon, target: recon.mean().item()}
    row = run_row("main", "VQ 1024x128", data, RunConfig(**config), scorers, seed=0)
    return row, seen


def test_best_validation_checkpoint_is_reported(monkeypatch):
    # lowest at step 0 (untrained: never chosen), then at step 20; the last step is 40
    mse = {0: 0.1, 10: 0.5, 20: 0.2, 30: 0.4, 40: 0.3}
    row, seen = _fake_run(monkeypatch, mse, steps=40, val_every=10)
    m = row.metrics
    assert (m["best_step"], m["psnr"], m["mse"], m["usage"]) == (20, 20.0, 0.2, 0.2)
    assert m["lpips"] == 20.0  # scored on the best checkpoint's reconstructions
    assert m["final_usage"] == 0.4 and m["seconds"] == 12.0
    assert row.curve == [(0, 0.0), (10, 0.1), (20, 0.2), (30, 0.3), (40, 0.4)]
    assert seen["variance"].item() == pytest.approx(0.25)  # the official divisor
    # the final weights win when they are the best; the default interval is one epoch
    mse = {0: 0.1, 2: 0.5, 3: 0.2}
    row, _ = _fake_run(monkeypatch, mse, steps=3, batch_size=2)  # 4 images: epoch of 2 steps
    assert row.metrics["best_step"] == 3 and [s for s, _ in row.curve] == [0, 2, 3]


def test_seeds_are_aggregated_by_hand():
    def run(seed, psnr, usage, lpips=None):
        metrics = dict(usage=usage, psnr=psnr, seconds=10.0 * seed, lpips=lpips)
        return Row("main", "VQ 1024x128", "vq", {}, metrics, [(0, 0.0), (5, usage)], [seed])

    runs = [run(0, 18.0, 0.1), run(1, 21.0, 0.3), run(2, 19.5, 0.2)]
    (row,) = aggregate(runs)
    assert row.seeds == [0, 1, 2]
    assert row.metrics["psnr"] == pytest.approx(19.5) and row.spread["psnr"] == (18.0, 21.0)
    assert row.metrics["usage"] == pytest.approx(0.2) and row.spread["usage"] == (0.1, 0.3)
    assert row.metrics["lpips"] is None and "lpips" not in row.spread  # not measured
    assert row.curve == [(0, 0.0), (5, pytest.approx(0.2))]
    text = format_tables(runs, RunConfig(seeds=[0, 1, 2]), {})
    assert "seeds 0 1 2 (mean (min–max))" in text
    assert "| VQ 1024x128 | ours | 20.0% (10.0%–30.0%) | – | – | – | 19.50 (18.00–21.00) |" in text
    assert aggregate(runs[:1]) == runs[:1]  # one seed: as it is


def test_table_marks_skipped_metrics_and_draws_without_matplotlib(tmp_path):
    metrics = dict(
        usage=0.5, final_usage=0.25, perplexity=3.0, psnr=20.0, ssim=0.8, l1=0.05, best_step=300
    )
    name = "LooC 32x4 (unshuffle, interpolated)"
    rows = [Row("main", name, "looc", {}, {**metrics, "seconds": 1.0}, [(0, 0.1), (5, 0.5)])]
    text = format_tables(rows, RunConfig(), {"lpips": "weights missing: vgg16.pth"})
    cells = "50.0% | – | 25.0% | 3.0 | 20.00 | 0.8000 | 0.0500 | skipped | – | 300 | 1 s"
    ours = f"| {name} | ours | {cells} |"
    cells = "– | – | – | – | 35.15 | 0.9961 | 0.0082 | 0.0083 | 1.70 | – | –"
    paper = f"| {name} | LooC Tab. 1 | {cells} |"
    assert ours in text and paper in text
    assert "LPIPS: skipped (weights missing: vgg16.pth)" in text
    for row in OFFICIAL + OFFICIAL_CPU:
        assert "| " + " | ".join(row) + " |" in text
    assert "seed 0," in text and "Validation every 9 steps (one epoch)" in text
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
            "--seeds",
            "0",
            "1",
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
    expected = ["VQ 1024x128", "CVQ 512x64 (closest)", "LooC 32x4 (unshuffle, interpolated)"]
    for name in expected:
        assert f"| {name} | ours |" in table
        assert name not in PAPERS or f"| {name} | {PAPERS[name][0]} |" in table
    for row in OFFICIAL + OFFICIAL_CPU:
        assert "| " + " | ".join(row) + " |" in table
    for metric in ("LPIPS", "rFID"):  # tests never download: missing weights are reported
        assert f"{metric}: skipped (weights missing:" in table

    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["name"], r["seeds"]) for r in results["rows"]] == [
        (name, [seed]) for name in expected for seed in (0, 1)
    ]
    assert [(r["name"], r["seeds"]) for r in results["summary"]] == [
        (name, [0, 1]) for name in expected
    ]
    assert results["config"]["steps"] == 20 and results["config"]["seeds"] == [0, 1]
    for r in results["rows"]:
        for key in ("usage", "final_usage", "perplexity", "psnr", "ssim", "l1", "seconds"):
            assert math.isfinite(r["metrics"][key]), (r["name"], key)
        assert 0 < r["metrics"]["usage"] <= 1 and r["metrics"]["best_step"] in (10, 20)
        assert [step for step, _ in r["curve"]] == [0, 10, 20]
    for r in results["summary"]:
        lo, hi = r["spread"]["psnr"]
        assert lo <= r["metrics"]["psnr"] <= hi

    png = tmp_path / "usage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_an_interrupted_table_resumes_from_its_results(monkeypatch, tmp_path):
    """Runs kept in results.json are not run again; the file is rewritten after every run; the
    ≈16k-code rows of the field run the first seed only; other settings are refused."""
    trained = []

    def fake_row(table, name, data, config, scorers, seed=0):
        trained.append((name, seed))
        metrics = dict(
            usage=0.5,
            final_usage=0.5,
            perplexity=2.0,
            psnr=20.0 + seed,
            ssim=0.5,
            l1=0.1,
            best_step=4,
            seconds=1.0,
            dead_codes=3,
        )
        return Row(table, name, "x", {}, metrics, [(0, 0.1), (4, 0.5)], [seed])

    monkeypatch.setattr(reproduce, "run_row", fake_row)
    config = RunConfig(steps=4, seeds=[0, 1])
    rows = {"field": ["VQ 1024x128", "VQ 16384x128"]}
    saved = []

    def save(runs):
        reproduce.write_outputs(runs, config, {}, tmp_path)
        saved.append(len(runs))
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed after its second run

    with pytest.raises(KeyboardInterrupt):
        reproduce.run_tables(["field"], None, config, {}, rows=rows, saved=save)
    assert trained == [("VQ 1024x128", 0), ("VQ 1024x128", 1)]
    done = reproduce.load_runs(tmp_path / "results.json", config)
    assert [(r.name, r.seeds) for r in done] == [("VQ 1024x128", [0]), ("VQ 1024x128", [1])]
    assert done[1].curve == [(0, 0.1), (4, 0.5)]
    trained.clear()
    results = reproduce.run_tables(["field"], None, config, {}, rows=rows, done=done, saved=save)
    assert trained == [("VQ 16384x128", 0)]  # the rest, and the 16k row with one seed
    assert [r.seeds[0] for r in results] == [0, 1, 0]
    (row,) = [r for r in aggregate(results) if r.name == "VQ 1024x128"]
    assert row.metrics["psnr"] == 20.5 and row.spread["psnr"] == (20.0, 21.0)
    with pytest.raises(ValueError, match=r"other settings \(steps: 4 there, 5 now\)"):
        reproduce.load_runs(tmp_path / "results.json", RunConfig(steps=5, seeds=[0]))
    assert reproduce.load_runs(tmp_path / "none.json", config) == []
