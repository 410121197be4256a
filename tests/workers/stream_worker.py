"""Run by tests/engine/test_streaming.py under
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``.

Each rank builds the train part of a streamed source, reads its first epoch of (undecoded)
examples and its first micro-batches, and writes ``rank-R.json`` (world size, the labels of its
first epoch, the labels of its first batches) to the report folder.

Arguments: DATA_CONFIG_JSON REPORT_DIR
"""

import json
import sys
from pathlib import Path

import datasets
from accelerate import Accelerator

from engine.data import build_dataset
from engine.loader import stream_batches

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # an Arrow work-around: 5 s per epoch


def main(data: str, report_dir: str) -> None:
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    with accelerator.local_main_process_first():
        train = build_dataset(json.loads(data), "train")
    rows = train.process_rows(rank, world, seed=0)
    rows.set_epoch(0)
    epoch = [row["y"] for row in rows]
    batches = stream_batches(train, 2, 1, 0, 0, accelerator)
    seen = [int(y) for _ in range(len(epoch) // 2) for y in next(batches)["label"]]
    report = {"world_size": world, "epoch": epoch, "batches": seen}
    (Path(report_dir) / f"rank-{rank}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
