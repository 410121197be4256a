"""Pieces shared by the training loops of both stages: the checkpointed step counter, the
seeded, resumable batch order, and cross-process reductions."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

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
    return accelerator.reduce(torch.isfinite(loss.detach()).float(), reduction="min").item() == 1


def mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], device=accelerator.device, dtype=torch.float64)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))
