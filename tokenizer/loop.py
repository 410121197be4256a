"""Pieces shared by the training loops of both stages: the checkpointed step counter, the
seeded, resumable batch order, resuming, cross-process reductions, the non-finite guard, the
SIGTERM (pre-emption) stop and the end-of-run check that every process holds the same weights."""

from __future__ import annotations

import hashlib
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, Dataset

from .checkpoints import CheckpointError, checkpoint_step, load_checkpoint, resolve_resume
from .config import ConfigError
from .data import UnreadableImageError


class Progress:
    """The step counter, saved with every checkpoint (``save_checkpoint(states=...)``)."""

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
        # batches are made as the loader asks for them: no Python list of the epoch's indices
        loader = DataLoader(dataset, batch_sampler=(b.tolist() for b in
                                                    mine.reshape(-1, batch_size)),
                            num_workers=num_workers, generator=generator,
                            pin_memory=accelerator.device.type == "cuda")
        yield from loader
        epoch, skip = epoch + 1, 0


def all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process (all must agree to skip a step, or the
    collectives of the next step would deadlock)."""
    bad = (~torch.isfinite(loss.detach())).float()
    return accelerator.reduce(bad, reduction="max").item() == 0  # accelerate has no "min"


T = TypeVar("T")


def check_precision(accelerator: Accelerator) -> None:
    """Refuse a mixed precision the device lacks: fp16 (with loss scaling) is for CUDA; bf16
    runs on CPUs and on GPUs that have it."""
    device, precision = accelerator.device.type, accelerator.mixed_precision
    if precision == "fp16" and device != "cuda":
        raise ConfigError(f"train.mixed_precision = 'fp16' needs a CUDA device (this run is on "
                          f"{device}); choose bf16, which CPUs have, or no")
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision = 'bf16' is not supported by this GPU; choose "
                          "fp16 or no")


def main_process_decides(accelerator: Accelerator | None, decide: Callable[[], T]) -> T:
    """``decide()`` run by the main process alone, its result (or its exception) handed to every
    process. A decision that leads processes into collectives (a cache hit, a file that exists)
    must be the same on all of them: node-local folders may differ."""
    if accelerator is None or accelerator.num_processes == 1:
        return decide()
    outcome: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [decide(), None]
        except Exception as err:  # noqa: BLE001 - raised on every process below
            outcome = [None, err]
    broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


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


class StopRequest:
    """Pre-emption: SIGTERM sets a flag (the handler does nothing else, so a checkpoint being
    written is finished); ``requested()`` is true on every process once any process got it, so
    all stop at the same step and save one checkpoint together."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator, self.flag = accelerator, False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        t = torch.tensor([float(self.flag)], device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="max").item() > 0  # a collective: each step

    def stop_if_requested(self, step: int, saved: bool, save: Callable[[], Path]) -> None:
        """If any process got SIGTERM: save a checkpoint (unless ``saved``: this step's is
        written) on every process together and raise ``Preempted``."""
        if self.requested():
            where = None if saved else save()
            raise Preempted(f"stopped by SIGTERM at step {step}"
                            + (f"; checkpoint saved in {where}" if where else "")
                            + "; continue with --resume latest")

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; ``--resume latest`` goes on."""


# what the training scripts report in one line instead of a traceback
RUN_ERRORS = (ConfigError, FileNotFoundError, ImportError,  # config; missing weights, data, extras
              CheckpointError, FloatingPointError,  # disk full; losses diverged
              UnreadableImageError)  # data.strict: true


def run_training(train: Callable[[], object], errors: tuple[type[Exception], ...] = ()) -> None:
    """A script's call of a trainer: pre-emption (the state is saved) is a clean exit,
    ``RUN_ERRORS`` and ``errors`` are one-line messages."""
    try:
        train()
    except Preempted as e:
        print(e, file=sys.stderr)
    except RUN_ERRORS + errors as e:
        sys.exit(f"error: {e}")


@contextmanager
def preemptible(accelerator: Accelerator, bar):
    """The training loop's block: yields the ``StopRequest``; on pre-emption the progress bar
    and the logs are closed before ``Preempted`` goes up; the SIGTERM handler is restored."""
    stop = StopRequest(accelerator)
    try:
        yield stop
    except Preempted:
        bar.close()
        accelerator.end_training()  # flush the logs
        raise
    finally:
        stop.close()
    bar.close()


def check_replicas_agree(accelerator: Accelerator, tensors: dict[str, torch.Tensor]) -> None:
    """Raise, naming them, if any process holds other weights or buffers (e.g. codebooks) than
    process 0: a SHA-256 of each tensor's bytes, gathered and compared exactly."""
    if accelerator.num_processes == 1:
        return
    names = sorted(tensors)
    digests = []
    for name in names:
        data = tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        digests.append(int.from_bytes(hashlib.sha256(data).digest()[:7], "big"))
    mine = torch.tensor(digests, dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine.unsqueeze(0))
    differ = [n for n, column in zip(names, every.T) if len(set(column.tolist())) > 1]
    if differ:
        raise RuntimeError(f"processes ended with different {differ[:5]} ({len(differ)} "
                           "tensors); please report this with your config")
    accelerator.print(f"weights identical on all {accelerator.num_processes} processes")


def start_run(accelerator: Accelerator, output_dir: Path, resume: str | None,
              config: dict, states: dict[str, Any]) -> Path:
    """Resume from a checkpoint if asked (all processes; ``states`` are our own objects saved
    with it), write the config as run, start the TensorBoard logs; returns the checkpoint
    folder."""
    checkpoints = output_dir / "checkpoints"
    start = resolve_resume(resume, checkpoints)
    if start is not None:
        load_checkpoint(accelerator, start, states)
        accelerator.print(f"resumed from {start} at step {checkpoint_step(start)}")
    elif resume:
        accelerator.print(f"--resume {resume}: no checkpoint in {checkpoints}, starting fresh")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    accelerator.init_trackers("logs")
    return checkpoints
