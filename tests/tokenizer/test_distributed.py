"""Two real processes (CPU, gloo) must end with bit-identical codebooks and statistics although
each sees different data."""

import json

import pytest
import torch

from tests.launch import ROOT, launch_two_processes
from tests.workers.distributed_worker import GRADIENTS, SETTINGS, Tiny, loss_of
from tokenizer.quantizers import build_quantizer

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
    # the entropy of the mean over both processes' batches (LFQ, IBQ): the averaged gradient of
    # the two processes is that of one process holding both batches
    saved = torch.load(str(report_path) + ".gradients.pt", weights_only=True)
    assert set(saved) == set(GRADIENTS)
    for name, run in saved.items():
        kind, options = SETTINGS[name]
        model = Tiny(build_quantizer(kind, **options))
        model.load_state_dict(run["initial"])
        assert run["x"].shape[0] == 8  # both batches
        loss_of(model, run["x"]).backward()
        for param, grad in run["grads"].items():
            expected = dict(model.named_parameters())[param].grad
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")
