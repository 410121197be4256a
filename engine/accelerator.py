"""A run's ``accelerate`` set-up (:func:`start_accelerator`): precision and accumulation from the
recipe or the launcher, trackers, the precision checked against the device
(:func:`check_precision`), seeds, the output folder locked; and the learning-rate rule
(:func:`learning_rate`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    LoggerType,
    ProjectConfiguration,
    set_seed,
)

from .config import ConfigError
from .distributed import check_shared_folder
from .lock import lock_output_dir

# the runtime settings accelerate owns: train.<key> → (the launcher's environment variable,
# its flag); ``accelerate launch`` and ``accelerate config`` set these variables
LAUNCHER = {
    "mixed_precision": ("ACCELERATE_MIXED_PRECISION", "--mixed_precision"),
    "gradient_accumulation_steps": (
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "--gradient_accumulation_steps",
    ),
}
REPORT_TO = ("all", "none", *(str(t) for t in LoggerType))


def check_precision(accelerator: Accelerator) -> None:
    """Refuse a mixed precision the device lacks: fp16 (with loss scaling) is for CUDA; bf16
    runs on CPUs and on GPUs that have it."""
    device, precision = accelerator.device.type, accelerator.mixed_precision
    if precision == "fp16" and device != "cuda":
        raise ConfigError(
            f"mixed precision fp16 (train.mixed_precision or accelerate's --mixed_precision) "
            f"needs a CUDA device (this run is on {device}); choose bf16, which CPUs have, or no"
        )
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "mixed precision bf16 (train.mixed_precision or accelerate's --mixed_precision) "
            "is not supported by this GPU; choose fp16 or no"
        )


def start_accelerator(train: Any, output_dir: str | Path) -> Accelerator:
    """The run's accelerator. Precision and accumulation come from the launcher (``accelerate
    launch --mixed_precision bf16``, ``accelerate config``) unless the recipe sets
    ``train.mixed_precision`` / ``train.gradient_accumulation_steps``; if both set one and
    disagree, the recipe wins with a one-line warning naming both. The values in effect are
    written back into ``train`` (so the saved config.yaml says what ran). Trackers:
    ``train.report_to`` with logs under OUTPUT_DIR/logs. The precision is checked against the
    device and every random generator seeded with ``train.seed`` plus the process index. The
    main process locks ``output_dir`` (:mod:`engine.lock`): one run per folder."""
    overridden = []
    for key, (env, flag) in LAUNCHER.items():
        recipe, launcher = getattr(train, key), os.environ.get(env)
        if recipe is not None and launcher is not None and str(recipe) != launcher:
            overridden.append(
                f"train.{key}={recipe} from the recipe overrides the launcher's {flag} "
                f"{launcher} (drop the key from the recipe to let the launcher decide)"
            )
    accumulation = train.gradient_accumulation_steps
    plugin = None if accumulation is None else GradientAccumulationPlugin(num_steps=accumulation)
    report_to = None if train.report_to == "none" else train.report_to
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,  # None: the launcher's, else "no"
        gradient_accumulation_plugin=plugin,  # None: the launcher's, else 1
        log_with=report_to,
        # no buffer broadcast before every forward (a collective each): the code that changes
        # buffers keeps them equal (the quantizers' synchronised update, ActNorm's all-reduced
        # initialisation); the trainers broadcast what stays per-process (BatchNorm statistics)
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")
        ),
    )
    if report_to not in (None, "all") and not accelerator.log_with:
        raise ImportError(
            f"train.report_to={train.report_to}: that tracker's package is not installed "
            f"(pip install {train.report_to}), or choose one of {list(REPORT_TO)}"
        )
    if accelerator.is_main_process:  # once, not once per process
        for message in overridden:
            warnings.warn(message, stacklevel=2)
    train.mixed_precision = str(accelerator.mixed_precision)
    train.gradient_accumulation_steps = accelerator.gradient_accumulation_steps
    check_precision(accelerator)
    torch.backends.cuda.matmul.allow_tf32 = train.allow_tf32
    torch.backends.cudnn.allow_tf32 = train.allow_tf32
    # each process its own random stream (diffusion noise, CVQ anchor draws, label dropout);
    # weights start equal anyway, ``prepare`` broadcasts process 0's
    set_seed(train.seed, device_specific=True)
    lock_output_dir(accelerator, output_dir)  # before anything is written there
    check_shared_folder(accelerator, output_dir, "the output folder")
    return accelerator


def learning_rate(train: Any, accelerator: Accelerator) -> float:
    """``train.learning_rate``, times batch × accumulation × processes if ``train.scale_lr``
    (taming-transformers' and LDM's rule)."""
    scale = train.batch_size * train.gradient_accumulation_steps * accelerator.num_processes
    return train.learning_rate * (scale if train.scale_lr else 1)
