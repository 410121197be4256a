"""scripts/benchmark.py: one Markdown table with a row per benchmark, --only, --json."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.launch import ROOT

pytestmark = pytest.mark.slow  # subprocesses, two processes: minutes

# every family but "waits": its two-process runs are tests/engine/test_waits.py's, which asserts
# its rows
FAMILIES = (
    "quantizer",
    "codebooks",
    "launches",
    "tokenizer",
    "unet",
    "sampling",
    "inception",
    "cache",
    "data",
)


def benchmark(*args, tmp_path):
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch"),  # no cached Inception weights
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--size", "tiny", "--device", "cpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(stdout):
    return [
        line
        for line in stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| what")
    ]


def test_every_row_family_is_timed_and_written_as_json(tmp_path):
    stdout = benchmark(
        "--only",
        ",".join(FAMILIES),
        "--random-inception",
        "--json",
        tmp_path / "rows.json",
        "--codebook-sizes",
        "1024",
        "--codebook-rows",
        "512",
        tmp_path=tmp_path,
    )
    assert stdout.startswith("Device: CPU") and "torch " in stdout
    data = json.loads((tmp_path / "rows.json").read_text())
    assert data["size"] == "tiny" and data["device"] == "cpu"
    rows = data["rows"]
    assert len(table_rows(stdout)) == len(rows)
    assert {r["family"] for r in rows} == set(FAMILIES)
    for r in rows:
        if r["notes"] == "not installed":  # vector-quantize-pytorch, where it is absent
            assert r["seconds"] is None and "vector-quantize-pytorch" in r["what"]
            continue
        if r["family"] == "launches":  # counts, not times, on the CPU
            assert r["seconds"] is None and r["count"] > 0, r
            continue
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert math.isfinite(r["throughput"]) and r["throughput"] > 0, r
    whats = [r["what"] for r in rows]
    assert any("tiled" in w for w in whats) and any("dense" in w for w in whats)
    targets = [r for r in rows if r["notes"].startswith("target <=")]  # the CPU cases
    assert len(targets) == 5 and all(r["family"] == "quantizer" for r in targets)
    assert all("x the limit" in r["notes"] for r in targets)  # the ratio to the arithmetic
    assert any("LDMPipeline" in w for w in whats) and any("ours" in w for w in whats)
    codebooks = [r for r in rows if r["family"] == "codebooks"]  # each kind in its own process
    assert [r["what"].split()[0] for r in codebooks] == ["VQ", "CVQ", "SimVQ", "IBQ", "LFQ"]
    assert all("dense N×K scores: 2 MiB" in r["notes"] and r["peak_bytes"] > 0 for r in codebooks)
    cache = [r for r in rows if r["family"] == "cache"]  # 2 sizes x 2 kinds x 1, 2 processes
    assert len(cache) == 8 and all("on opening" in r["notes"] for r in cache)
    assert {r["unit"] for r in rows if r["family"] == "data"} == {"files/s", "images/s"}


def test_only_selects_rows_and_inception_without_weights_is_skipped(tmp_path):
    stdout = benchmark(
        "--only",
        "tokenizer,inception",
        "--tokenizer-config",
        "configs/tokenizer/digits_cvq.yaml",
        "--steps",
        "1",
        tmp_path=tmp_path,
    )
    rows = table_rows(stdout)
    assert len(rows) == 2
    assert (
        "| tokenizer training, fp32 eager | configs/tokenizer/digits_cvq.yaml, batch 4 |" in rows[0]
    )
    assert "images/s" in rows[0]
    assert rows[1].startswith("| Inception v3 features") and "skipped: no weights" in rows[1]
