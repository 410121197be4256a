"""Issue 20: the fused Triton search kernels equal the PyTorch path (indices and closest anchors
exactly, probabilistic anchors in distribution), run on the CPU by Triton's interpreter."""

import json
import os
import subprocess
import sys

import pytest

from tests.launch import ROOT

pytest.importorskip("triton")


def test_triton_kernels_equal_the_pytorch_search(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "workers" / "triton_search_worker.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["interpreted"] == "InterpretedFunction"  # the kernels ran, interpreted
    assert len(report["cases"]) == 8
    for case in report["cases"]:
        assert case["indices"] and case["indices_alone"] and case["anchors"], case
        assert case["scores"] < 1e-4, case
    for got, expected in zip(report["frequencies"], report["expected"]):
        assert got == pytest.approx(expected, abs=0.012)
