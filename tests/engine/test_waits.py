"""Issue 15: a training step waits for the device once and makes one collective of its own
(plus the codebook's state, one per quantizer forward), counted on two real processes."""

import json

import pytest
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
    """Both stages on two processes, bf16, two micro-batches per step, the discriminator on:
    the benchmark's ``waits`` family (``scripts/benchmark.py --only waits``) counts them, and
    its rows say what the counted steps show."""
    from benchmarks.waits import bench_waits

    rows = bench_waits(None, torch.device("cpu"), folder=tmp_path)
    accumulation = 2
    assert [r["notes"].split(" (")[0] for r in rows] == [
        f"1 read(s), {1 + accumulation} collective(s) per step",
        "1 read(s), 1 collective(s) per step",
    ]
    for reads, collectives in _steps(tmp_path / "tokenizer"):
        assert reads == {"engine/run.py:_agree": 1}
        assert collectives == {
            "engine/run.py:_agree → accelerate/utils/operations.py:_reduce_across_processes": 1,
            # the codebook's usage counts and anchors: one gather per quantizer forward
            "tokenizer/quantizers/distributed.py:sum_counts_and_pick_anchors": accumulation,
        }
    for reads, collectives in _steps(tmp_path / "diffusion"):
        assert reads == {"engine/run.py:_agree": 1}
        assert list(collectives.values()) == [1] and "engine/run.py:_agree" in next(
            iter(collectives)
        )


QUANTIZER_COLLECTIVE = {  # the quantizer's own collective, one per forward
    "looc": "tokenizer/quantizers/distributed.py:sum_counts_and_pick_anchors",  # counts, anchors
    "lfq": "tokenizer/quantizers/distributed.py:all_reduce_sum",  # the batch entropy's mean
}


@pytest.mark.parametrize("kind", list(QUANTIZER_COLLECTIVE))
def test_the_imagenet_recipe_as_shipped_waits_once_per_step(
    kind, tmp_path, vgg_torch_home, monkeypatch
):
    """ImageNet f16 LooC and LFQ (2^18 codes) with their own settings (bf16, LPIPS, ActNorm
    discriminator, random crops and flips, 8 loader workers) at miniature size, the
    discriminator on from the start."""
    from engine.config import parse_yaml
    from tests.end_to_end.test_recipes import WIDTH, miniature_source

    path = ROOT / "configs" / "tokenizer" / f"imagenet_f16_{kind}.yaml"
    source = miniature_source(parse_yaml(path.read_text())["data"], tmp_path, 40)
    monkeypatch.setenv("TORCH_HOME", str(vgg_torch_home))
    launch_two_processes(
        SCRIPT,
        "tokenizer",
        "--config",
        str(path),
        "--output_dir",
        str(tmp_path / "run"),
        "--steps",
        "4",
        f"data.source={source}",
        "data.resolution=32",
        "model.resolution=32",
        f"model.ch={WIDTH}",
        "train.batch_size=2",
        "loss.disc_start=0",
        "loss.disc_channels=8",
        port=29541,
    )
    for reads, collectives in _steps(tmp_path / "run"):
        assert reads == {"engine/run.py:_agree": 1}
        assert collectives == {
            "engine/run.py:_agree → accelerate/utils/operations.py:_reduce_across_processes": 1,
            QUANTIZER_COLLECTIVE[kind]: 1,
        }
