"""Count what each training step waits for: reads of device values on the host and collectives,
per step and by the place in the code that makes them (engine/waits.py).

    accelerate launch scripts/count_waits.py tokenizer --config configs/tokenizer/X.yaml \
        --output_dir DIR [--steps 6] [section.key=value ...]
    accelerate launch scripts/count_waits.py diffusion --config configs/diffusion/Y.yaml \
        --tokenizer DIR/tokenizer --output_dir DIR [--steps 6] [section.key=value ...]

The run trains ``--steps`` steps with logging, validation, images and checkpoints only at the
last; every process writes its counts to DIR/waits-<process>.json and the main process prints
the steps between the first (set-up) and the last. Use the launcher's flags as for training
(two processes: ``--multi_gpu --num_processes 2``).
"""

import argparse
import json
import os
import sys
from pathlib import Path

from engine.config import ConfigError, load_config

# torch keeps Adam's step counters on the host (unless fused or capturable): reading them does
# not wait for the device
HOST_COUNTERS = "torch/optim/optimizer.py:_get_value"
QUIET = [
    f"train.{key}=1000000000" for key in ("log_every", "validation_steps", "checkpointing_steps")
]


def counted_steps(waits, record: list):
    """``Run.steps`` that records the waits of every step (``waits``: an
    ``engine.waits.CountWaits``)."""
    from engine.run import Run

    steps = Run.steps

    def wrapper(run):
        waits.take()
        for step in steps(run):
            yield step
            reads, collectives = waits.take()
            record.append({"step": step, "reads": reads, "collectives": collectives})

    return wrapper


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("tokenizer", "diffusion"), help="the trainer to run")
    parser.add_argument("--config", required=True, help="the stage's YAML config")
    parser.add_argument(
        "--tokenizer",
        help="DIR/tokenizer from stage one, which the diffusion stage needs (default: none, "
        "for the tokenizer stage)",
    )
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        required=True,
        help="the run's folder; the counts go to DIR/waits-<process>.json",
    )
    parser.add_argument(
        "--steps", type=int, default=6, help="training steps to run (default: %(default)s)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.batch_size=4, before, between or after the options "
        "(default: none)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_intermixed_args()  # --help exits here, before torch is imported
    from engine.run import Run
    from engine.waits import CountWaits

    overrides = [*QUIET, f"train.max_steps={args.steps}", "train.report_to=none", *args.overrides]
    try:
        if args.stage == "tokenizer":
            from tokenizer.train import TokenizerConfig, train_tokenizer

            config = load_config(
                args.config, [*overrides, "train.image_every=1000000000"], TokenizerConfig
            )
            train = lambda: train_tokenizer(config, args.output_dir)  # noqa: E731
        else:
            from diffusion.train import DiffusionConfig, train_diffusion

            config = load_config(args.config, overrides, DiffusionConfig)
            train = lambda: train_diffusion(config, args.tokenizer, args.output_dir)  # noqa: E731
    except ConfigError as e:
        sys.exit(f"config error: {e}")

    record: list = []
    with CountWaits() as waits:
        Run.steps = counted_steps(waits, record)
        train()
    rank = int(os.environ.get("RANK", 0))
    Path(args.output_dir, f"waits-{rank}.json").write_text(json.dumps(record, indent=1))
    if rank == 0 and len(record) > 2:
        print("step  device reads  host counters  collectives")
        for row in record[1:-1]:
            counters = sum(n for place, n in row["reads"].items() if HOST_COUNTERS in place)
            reads = sum(row["reads"].values()) - counters
            collectives = sum(row["collectives"].values())
            print(f"{row['step']:>4}  {reads:>12}  {counters:>13}  {collectives:>11}")
        print(f"where, step {record[1]['step']}:")
        for kind in ("reads", "collectives"):
            for place, n in sorted(record[1][kind].items()):
                print(f"  {kind[:-1]:<10} {n:>4}  {place}")


if __name__ == "__main__":
    main()
