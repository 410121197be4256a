"""Issue 15: a training step waits for the device once and makes one collective of its own
(plus the codebook's state, one per quantizer forward), counted on two real processes."""

import json

import torch

from engine.waits import CountWaits
from tests.launch import ROOT, launch_two_processes

SCRIPT = ROOT / "scripts" / "count_waits.py"
HOST_COUNTERS = "torch/optim/optimizer.py:_get_value"  # Adam's step counters live on the host


def test_counts_reads_and_restores_what_it_patched():
    t = torch.arange(3.0)
    with CountWaits() as waits:
        t.sum().item()
        bool(t[0])
        t.tolist()
        t + 1  # no read
    reads, collectives = waits.take()
    assert sum(reads.values()) == 3 and not collectives
    assert "tolist" not in vars(torch.Tensor), "the patch is undone"
    with CountWaits() as waits:
        t.tolist()
    assert sum(waits.reads.values()) == 1, "a second counter counts again"


def _steps(folder):
    """The counted steps of both processes, without the first (set-up) and the last (logs,
    validation, checkpoint)."""
    for rank in (0, 1):
        record = json.loads((folder / f"waits-{rank}.json").read_text())
        assert len(record) == 4
        for row in record[1:-1]:
            reads = {p: n for p, n in row["reads"].items() if HOST_COUNTERS not in p}
            yield reads, row["collectives"]


def test_one_read_and_one_collective_per_step_on_two_processes(tmp_path):
    accumulation = 2
    launch_two_processes(
        SCRIPT,
        "tokenizer",
        "--config",
        str(ROOT / "configs/tokenizer/digits_looc.yaml"),
        "--output_dir",
        str(tmp_path / "tok"),
        "--steps",
        "4",
        "train.batch_size=4",
        "train.mixed_precision=bf16",
        f"train.gradient_accumulation_steps={accumulation}",
        "loss.disc_start=0",  # the discriminator's step too
        "data.validation_size=8",
    )
    for reads, collectives in _steps(tmp_path / "tok"):
        assert reads == {"engine/run.py:_agree": 1}
        assert collectives == {
            "engine/run.py:_agree → accelerate/utils/operations.py:_reduce_across_processes": 1,
            # the codebook's usage counts and anchors: one gather per quantizer forward
            "tokenizer/quantizers/distributed.py:sum_counts_and_pick_anchors": accumulation,
        }

    launch_two_processes(
        SCRIPT,
        "diffusion",
        "--config",
        str(ROOT / "configs/diffusion/digits_cond.yaml"),
        "--tokenizer",
        str(tmp_path / "tok" / "tokenizer"),
        "--output_dir",
        str(tmp_path / "dif"),
        "--steps",
        "4",
        "train.batch_size=4",
        "train.mixed_precision=bf16",
        f"train.gradient_accumulation_steps={accumulation}",
        "data.validation_size=8",
    )
    for reads, collectives in _steps(tmp_path / "dif"):
        assert reads == {"engine/run.py:_agree": 1}
        assert list(collectives.values()) == [1] and "engine/run.py:_agree" in next(
            iter(collectives)
        )
