"""Pieces shared by the training loops of both stages: the checkpointed step counter, the
seeded, resumable batch order, resuming, cross-process reductions and the non-finite guard."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from .checkpoints import checkpoint_step, resolve_resume
from .config import ConfigError


class Progress:
    """The step counter, saved with every checkpoint (``register_for_checkpointing``)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def seeded_batches(dataset: Dataset, batch_size: int, accumulation: int, seed: int,
                   num_workers: int, accelerator: Accelerator, start_step: int = 0):
    """Endless per-process micro-batches in a seeded per-epoch order (each process takes every
    N-th sample of a global batch); starting at ``start_step`` skips exactly the micro-batches
    already consumed, without loading them, so a resumed run sees the same data."""
    per_step = batch_size * accelerator.num_processes
    per_epoch = len(dataset) // per_step
    if per_epoch == 0:
        raise ConfigError(f"train.batch_size={batch_size} × {accelerator.num_processes} "
                          f"processes is larger than the {len(dataset)} training items")
    epoch, skip = divmod(start_step * accumulation, per_epoch)
    while True:
        # a private generator: creating a loader must not consume the global RNG stream
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(dataset), generator=generator)[: per_epoch * per_step]
        mine = order.view(per_epoch, per_step)[skip:, accelerator.process_index::
                                                    accelerator.num_processes]
        loader = DataLoader(dataset, batch_sampler=mine.reshape(-1, batch_size).tolist(),
                            num_workers=num_workers, generator=generator)
        yield from loader
        epoch, skip = epoch + 1, 0


def all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process (all must agree to skip a step, or the
    collectives of the next step would deadlock)."""
    bad = (~torch.isfinite(loss.detach())).float()
    return accelerator.reduce(bad, reduction="max").item() == 0  # accelerate has no "min"


def mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=accelerator.device, dtype=torch.float64)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


class NonFiniteGuard:
    """Counts non-finite steps in a row; ``limit`` of them stop the run with advice."""

    def __init__(self, limit: int, checkpoints: Path, accelerator: Accelerator):
        self.limit, self.checkpoints, self.accelerator, self.count = limit, checkpoints, \
            accelerator, 0

    def update(self, finite: bool, step: int) -> bool:
        """Record the step's outcome; returns whether it counts (False: it was skipped)."""
        if finite:
            self.count = 0
            return True
        self.count += 1
        self.accelerator.print(f"step {step}: non-finite loss, step skipped "
                               f"({self.count} in a row)")
        if self.count >= self.limit:
            raise FloatingPointError(
                f"{self.count} non-finite losses in a row at step {step}; the last good "
                f"checkpoint is in {self.checkpoints}. Try a lower train.learning_rate, "
                "train.mixed_precision: bf16 instead of fp16, or fp32 (\"no\").")
        return False


def start_run(accelerator: Accelerator, output_dir: Path, resume: str | None,
              config: dict) -> Path:
    """Resume from a checkpoint if asked (all processes), write the config as run, start the
    TensorBoard logs; returns the checkpoint folder."""
    checkpoints = output_dir / "checkpoints"
    start = resolve_resume(resume, checkpoints)
    if start is not None:
        accelerator.load_state(str(start))
        accelerator.print(f"resumed from {start} at step {checkpoint_step(start)}")
    elif resume:
        accelerator.print(f"--resume {resume}: no checkpoint in {checkpoints}, starting fresh")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    accelerator.init_trackers("logs")
    return checkpoints
