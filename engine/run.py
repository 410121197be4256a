"""The skeleton both trainers run in: :class:`Run` owns the step counter, the checkpointed
states, resuming, the non-finite guard, the progress bar, logging and pre-emption, so that a
trainer's loop reads top to bottom::

    run = Run(accelerator, output_dir, config, {"ema": ema}, resume=resume, name="diffusion")
    batches = run.batches(dataset)         # seeded, resumed exactly where the run stopped
    for step in run.steps():               # 0, 1, ...: the steps done so far
        for _ in range(accumulation):
            loss = ...
            if not run.finite(loss):       # every process skips the step together
                break
            accelerator.backward(loss); optimizer.step()
        if run.skipped:
            continue
        if run.due(config.train.log_every):
            run.log({"loss": loss.item()})

Also here: the seeded, resumable batch order, the precision check and what the scripts report
in one line.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoints import (
    CheckpointError,
    checkpoint_step,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from .config import ConfigError, to_mapping
from .data import UnreadableImageError
from .distributed import any_process, mean_over_processes


def seeded_batches(
    dataset: Dataset,
    batch_size: int,
    accumulation: int,
    seed: int,
    num_workers: int,
    accelerator: Accelerator,
    start_step: int = 0,
):
    """Endless per-process micro-batches in a seeded per-epoch order (each process takes every
    N-th sample of a global batch); starting at ``start_step`` skips exactly the micro-batches
    already consumed, without loading them, so a resumed run sees the same data."""
    per_step = batch_size * accelerator.num_processes
    per_epoch = len(dataset) // per_step
    if per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={batch_size} × {accelerator.num_processes} "
            f"processes is larger than the {len(dataset)} training items"
        )
    epoch, skip = divmod(start_step * accumulation, per_epoch)
    while True:
        # a private generator: creating a loader must not consume the global RNG stream
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(dataset), generator=generator)[: per_epoch * per_step]
        mine = order.view(per_epoch, per_step)[
            skip:, accelerator.process_index :: accelerator.num_processes
        ]
        # batches are made as the loader asks for them: no Python list of the epoch's indices
        loader = DataLoader(
            dataset,
            batch_sampler=(b.tolist() for b in mine.reshape(-1, batch_size)),
            num_workers=num_workers,
            generator=generator,
            pin_memory=accelerator.device.type == "cuda",
        )
        yield from loader
        epoch, skip = epoch + 1, 0


def check_precision(accelerator: Accelerator) -> None:
    """Refuse a mixed precision the device lacks: fp16 (with loss scaling) is for CUDA; bf16
    runs on CPUs and on GPUs that have it."""
    device, precision = accelerator.device.type, accelerator.mixed_precision
    if precision == "fp16" and device != "cuda":
        raise ConfigError(
            f"train.mixed_precision = 'fp16' needs a CUDA device (this run is on "
            f"{device}); choose bf16, which CPUs have, or no"
        )
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "train.mixed_precision = 'bf16' is not supported by this GPU; choose fp16 or no"
        )


def start_accelerator(train: Any, output_dir: str | Path) -> Accelerator:
    """The run's accelerator from its ``train`` section (``mixed_precision``,
    ``gradient_accumulation_steps``; TensorBoard logs under ``output_dir``), its precision
    checked against the device, every random generator seeded with ``train.seed``."""
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(output_dir),
    )
    check_precision(accelerator)
    set_seed(train.seed)
    return accelerator


def learning_rate(train: Any, accelerator: Accelerator) -> float:
    """``train.learning_rate``, times batch × accumulation × processes if ``train.scale_lr``
    (taming-transformers' and LDM's rule)."""
    scale = train.batch_size * train.gradient_accumulation_steps * accelerator.num_processes
    return train.learning_rate * (scale if train.scale_lr else 1)


class NonFiniteGuard:
    """Counts non-finite steps in a row; ``limit`` of them stop the run with advice."""

    def __init__(self, limit: int, checkpoints: Path, accelerator: Accelerator):
        self.limit, self.checkpoints, self.accelerator, self.count = (
            limit,
            checkpoints,
            accelerator,
            0,
        )

    def update(self, finite: bool, step: int) -> bool:
        """Record the step's outcome; returns whether it counts (False: it was skipped)."""
        if finite:
            self.count = 0
            return True
        self.count += 1
        self.accelerator.print(
            f"step {step}: non-finite loss, step skipped ({self.count} in a row)"
        )
        if self.count >= self.limit:
            raise FloatingPointError(
                f"{self.count} non-finite losses in a row at step {step}; the last good "
                f"checkpoint is in {self.checkpoints}. Try a lower train.learning_rate, "
                'train.mixed_precision: bf16 instead of fp16, or fp32 ("no").'
            )
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
        return any_process(self.accelerator, self.flag)  # a collective: each step

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; ``--resume latest`` goes on."""


class Run:
    """One training run of ``config`` (a whole config dataclass whose ``train`` section has
    ``max_steps``, ``batch_size``, ``gradient_accumulation_steps``, ``seed``, ``num_workers``,
    ``checkpoint_every``, ``keep_checkpoints`` and ``max_nonfinite_steps``): resumed from
    ``resume`` ("latest" or a checkpoint folder) if asked, the config as run written to
    OUTPUT_DIR/config.yaml, the trackers started (OUTPUT_DIR/logs).

    ``states`` are the run's own objects with ``state_dict``/``load_state_dict`` (an EMA, say),
    saved in every checkpoint beside accelerate's state and the step counter, and loaded
    ``weights_only``. :meth:`steps` drives the loop; checkpoints go to OUTPUT_DIR/checkpoints
    every ``checkpoint_every`` steps and at the end (the last ``keep_checkpoints`` kept);
    ``max_nonfinite_steps`` skipped steps in a row stop the run."""

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str | Path,
        config: Any,
        states: dict[str, Any],
        *,
        resume: str | None,
        name: str,
    ):
        self.accelerator, self.train, self.name = accelerator, config.train, name
        self.max_steps = config.train.max_steps
        self.output_dir = Path(output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        self.states = {"progress": self, **states}
        self.step, self.skipped = 0, False
        self.guard = NonFiniteGuard(config.train.max_nonfinite_steps, self.checkpoints, accelerator)
        start = resolve_resume(resume, self.checkpoints)
        if start is not None:
            load_checkpoint(accelerator, start, self.states)
            accelerator.print(f"resumed from {start} at step {checkpoint_step(start)}")
        elif resume:
            accelerator.print(
                f"--resume {resume}: no checkpoint in {self.checkpoints}, starting fresh"
            )
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(
                yaml.safe_dump(to_mapping(config), sort_keys=False)
            )
        accelerator.init_trackers("logs")

    def batches(self, dataset: Dataset):
        """This process's micro-batches of ``dataset`` from the step the run starts at
        (:func:`seeded_batches` with the ``train`` section's settings)."""
        t = self.train
        return seeded_batches(
            dataset,
            t.batch_size,
            t.gradient_accumulation_steps,
            t.seed,
            t.num_workers,
            self.accelerator,
            self.step,
        )

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def steps(self) -> Iterator[int]:
        """Yield the number of steps done so far until ``max_steps`` are done. A step that the
        body marked non-finite (:meth:`finite`) is taken again; a finished step is counted
        and checkpointed when due. Before each step every process learns whether any got
        SIGTERM: then all save a checkpoint together and :class:`Preempted` is raised."""
        stop, saved = StopRequest(self.accelerator), None
        self.bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc=self.name,
            disable=not self.accelerator.is_local_main_process,
        )
        try:
            while self.step < self.max_steps:
                if stop.requested():
                    where = None if saved == self.step else self.save()
                    raise Preempted(
                        f"stopped by SIGTERM at step {self.step}"
                        + (f"; checkpoint saved in {where}" if where else "")
                        + "; continue with --resume latest"
                    )
                self.skipped = False
                yield self.step
                if not self.guard.update(not self.skipped, self.step):
                    continue
                self.step += 1
                self.bar.update(1)
                if self.step % self.train.checkpoint_every == 0 or self.step == self.max_steps:
                    self.save()
                    saved = self.step
        except Preempted:
            self.accelerator.end_training()  # flush the logs
            raise
        finally:
            stop.close()
            self.bar.close()

    def finite(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every process; if not, the step is skipped everywhere
        (all must agree, or the collectives of the next step would deadlock)."""
        self.skipped = any_process(self.accelerator, not torch.isfinite(loss.detach()).all())
        return not self.skipped

    def due(self, every: int) -> bool:
        """Whether the step being taken ends at a multiple of ``every`` or is the last one."""
        done = self.step + 1
        return done % every == 0 or done == self.max_steps

    def log(self, values: dict[str, float], show: tuple[str, ...] = ()) -> dict[str, float]:
        """Log ``values`` averaged over the processes at the step being taken; ``show`` names
        those written beside the progress bar. Returns the averages."""
        values = mean_over_processes(self.accelerator, values)
        self.accelerator.log(values, step=self.step + 1)
        shown = {k: f"{values[k]:.3g}" for k in show if k in values}
        if shown:
            self.bar.set_postfix(shown)
        return values

    def save(self) -> Path:
        """A checkpoint of the steps done, written by every process together."""
        return save_checkpoint(
            self.accelerator, self.checkpoints, self.step, self.train.keep_checkpoints, self.states
        )


# what the training scripts report in one line instead of a traceback
RUN_ERRORS = (
    ConfigError,
    FileNotFoundError,
    ImportError,  # config; missing weights, data, extras
    CheckpointError,
    FloatingPointError,  # disk full; losses diverged
    UnreadableImageError,
)  # data.strict: true


def run_training(train: Callable[[], object], errors: tuple[type[Exception], ...] = ()) -> None:
    """A script's call of a trainer: pre-emption (the state is saved) is a clean exit,
    ``RUN_ERRORS`` and ``errors`` are one-line messages."""
    try:
        train()
    except Preempted as e:
        print(e, file=sys.stderr)
    except RUN_ERRORS + errors as e:
        sys.exit(f"error: {e}")
