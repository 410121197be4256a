"""What the training scripts share on the command line: the options, dotted overrides in any
order among them, and the config loaded (or a one-line error)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TypeVar

from .config import ConfigError, load_config

C = TypeVar("C")


def training_parser(doc: str, recipes: str) -> argparse.ArgumentParser:
    """The options every trainer takes; ``recipes`` names its configs' folder."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", required=True, help=f"YAML config ({recipes}/*.yaml)")
    parser.add_argument("--output_dir", "--output-dir", help="default: runs/<config name>")
    parser.add_argument(
        "--resume_from_checkpoint", help='"latest", a checkpoint-N name or a checkpoint folder'
    )
    parser.add_argument("--report_to", help="the train.report_to tracker: tensorboard, wandb, …")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, before, between or after the options: train.max_steps=100",
    )
    return parser


def parse_training(parser: argparse.ArgumentParser, cls: type[C]) -> tuple[Any, C, str]:
    """(arguments, the config ``cls`` with the overrides, the output folder); a config error
    ends the script with one line."""
    args = parser.parse_intermixed_args()  # overrides may come before an option
    overrides = args.overrides + ([f"train.report_to={args.report_to}"] if args.report_to else [])
    try:
        config = load_config(args.config, overrides, cls)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    return args, config, args.output_dir or str(Path("runs") / Path(args.config).stem)
