"""What the scripts share on the command line: the trainers' options, dotted overrides in any
order among them, the config loaded (or a one-line error), and the trainer's call, whose
expected failures are one line too (:func:`run_training`).

This module imports only the standard library and :mod:`engine.config` (yaml): a script builds
its parser and parses (``--help`` answers and exits) before it imports torch or a trainer. A
value the help shows that belongs to a heavy module is copied into the script and compared with
the library's right after the heavy import (:func:`same_as_library`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .config import ConfigError, load_config

C = TypeVar("C")


def training_parser(doc: str, recipes: str) -> argparse.ArgumentParser:
    """The options every trainer takes; ``recipes`` names its configs' folder."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", required=True, help=f"YAML config ({recipes}/*.yaml)")
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        help="the run's folder: checkpoints, logs, exports (default: runs/<config name>)",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        help='"latest", a checkpoint-N name or a checkpoint folder (default: start afresh)',
    )
    parser.add_argument(
        "--report_to",
        help="the train.report_to tracker: tensorboard, wandb, … (default: the config's)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, before, between or after the options: train.max_steps=100 "
        "(default: none)",
    )
    return parser


def parse_training_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments of a trainer's command line, overrides in any order among the options;
    ``--help`` and usage errors exit here, before the trainer is imported."""
    return parser.parse_intermixed_args()


def load_run_config(args: argparse.Namespace, cls: type[C]) -> tuple[C, str]:
    """(the config ``cls`` of ``args.config`` with the overrides, the output folder); a config
    error ends the script with one line."""
    overrides = args.overrides + ([f"train.report_to={args.report_to}"] if args.report_to else [])
    try:
        config = load_config(args.config, overrides, cls)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    return config, args.output_dir or str(Path("runs") / Path(args.config).stem)


def run_errors() -> tuple[type[Exception], ...]:
    """What the training scripts report in one line instead of a traceback (imported when a
    trainer runs: the modules that define them import torch)."""
    from .checkpoints import CheckpointError
    from .data import UnreadableImageError

    # a config; missing weights, data or extras; a full disk; diverged losses; data.strict
    return (
        ConfigError,
        FileNotFoundError,
        ImportError,
        CheckpointError,
        FloatingPointError,
        UnreadableImageError,
    )


def run_training(train: Callable[[], object], errors: tuple[type[Exception], ...] = ()) -> None:
    """A script's call of a trainer: pre-emption (the state is saved) is a clean exit,
    :func:`run_errors` and ``errors`` are one-line messages."""
    from .lock import release_folders
    from .run import Preempted

    try:
        train()
    except Preempted as e:
        print(e, file=sys.stderr)
    except run_errors() + errors as e:
        sys.exit(f"error: {e}")
    finally:
        release_folders()


def same_as_library(name: str, script: Any, library: Any) -> None:
    """A script's copy of a library value (for its ``--help``) must be the library's: called
    right after the heavy import, it ends the script if someone changed one and not the other."""
    if script != library:
        raise RuntimeError(
            f"{name}: the script's copy {script!r} differs from the library's {library!r}; "
            "update the script"
        )
