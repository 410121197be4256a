"""Two real processes (CPU, gloo) must end with bit-identical codebooks and statistics although
each sees different data."""

import json

import pytest

from tests.launch import ROOT, launch_two_processes

pytestmark = pytest.mark.slow  # subprocesses, two processes: minutes


def test_codebooks_identical_on_two_processes_with_different_data(tmp_path):
    report_path = tmp_path / "report.json"
    launch_two_processes(ROOT / "tests" / "workers" / "distributed_worker.py", str(report_path))
    report = json.loads(report_path.read_text())
    assert report.pop("world_size") == 2
    assert report.pop("skip_agreed") and report.pop("finite_agreed")
    assert report.pop("actnorm_difference") == 0.0, "ActNorm initialised per process"
    for name, r in report.items():
        assert r["local_counts_differ"], f"{name}: ranks saw the same codes; test is vacuous"
        assert r["max_state_difference"] == 0.0, f"{name}: ranks diverged: {r}"
