"""Two real processes (CPU, gloo) must end with bit-identical codebooks and statistics although
each sees different data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch_two_processes(script: Path, *args: str, timeout: int = 600) -> None:
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    # `--cpu --num_processes 2` would silently start one process; --multi_gpu with
    # ACCELERATE_USE_CPU=1 starts two CPU processes over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29533", str(script), *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_codebooks_identical_on_two_processes_with_different_data(tmp_path):
    report_path = tmp_path / "report.json"
    launch_two_processes(ROOT / "tests" / "distributed_worker.py", str(report_path))
    report = json.loads(report_path.read_text())
    assert report.pop("world_size") == 2
    for name, r in report.items():
        assert r["local_counts_differ"], f"{name}: ranks saw the same codes; test is vacuous"
        assert r["max_state_difference"] == 0.0, f"{name}: ranks diverged: {r}"
