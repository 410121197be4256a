"""The skeleton both trainers run in: :class:`Run` owns the step counter, the checkpointed
states, resuming, the non-finite guard, the progress bar, logging and pre-emption, so that a
trainer's loop reads top to bottom::

    run = Run(accelerator, output_dir, config, {"ema": ema}, resume=resume, name="diffusion")
    batches = run.batches(dataset)         # seeded, resumed exactly where the run stopped
    for step in run.steps():               # 0, 1, ...: the steps done so far
        for _ in range(accumulation):
            with accelerator.accumulate(model):
                loss = ...
                accelerator.backward(loss)
                if not run.check_finite(loss):  # every process skips the step together
                    optimizer.zero_grad()
                    break
                optimizer.step(); optimizer.zero_grad()
        if run.skipped:
            continue
        if run.is_due(config.train.log_every):
            run.log({"loss": loss.detach()})  # read from the device at logging steps only
        if run.is_due(config.train.validation_steps):
            scores = validate(...)             # reduced over the processes
            if run.record_validation(scores, "validation/loss"):  # the lowest so far
                export(output_dir / "pipeline-best", ...)  # engine.checkpoints.export

Outside logging, validation and checkpoint steps a step waits for the device once and makes
one collective of its own (:meth:`Run.check_finite`: the non-finite and SIGTERM flags
together).

Around it: the accelerator (:mod:`engine.accelerator`), the batches (:mod:`engine.loader`), the
checkpoints and exports (:mod:`engine.checkpoints`), the scripts' one-line errors
(:mod:`engine.cli`).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from torch.utils.data import Dataset
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from .checkpoints import (
    checkpoint_step,
    complete_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from .config import to_mapping
from .data import ImageStream
from .distributed import mean_over_processes
from .loader import seeded_batches, stream_batches


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
            saved = complete_checkpoints(self.checkpoints)
            where = (
                f"the last checkpoint before them is {saved[-1]}"
                if saved
                else "no checkpoint was written before them"
            )
            raise FloatingPointError(
                f"{self.count} non-finite losses in a row at step {step}; {where}. Try a lower "
                'train.learning_rate, train.mixed_precision: bf16 instead of fp16, or fp32 ("no").'
            )
        return False


class StopRequest:
    """Pre-emption: SIGTERM sets ``flag`` (the handler does nothing else, so a checkpoint being
    written is finished). :class:`Run` shares it with the other processes in the step's one
    reduction, so all stop after the same step and save one checkpoint together."""

    def __init__(self):
        self.flag = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; ``--resume latest`` goes on."""


def hyperparameters(config: Any) -> dict[str, int | float | str | bool]:
    """The config as flat ``section.key`` → scalar pairs, as trackers take hyperparameters
    (lists and nulls as text)."""
    flat = {}
    for section, values in to_mapping(config).items():
        for key, value in (values or {}).items():
            ok = isinstance(value, (int, float, str, bool))
            flat[f"{section}.{key}"] = value if ok else json.dumps(value)
    return flat


class Run:
    """One training run of ``config`` (a whole config dataclass whose ``train`` section is a
    :class:`RunConfig`): resumed from ``resume`` ("latest" or a checkpoint folder) if asked, the
    config as run written to OUTPUT_DIR/config.yaml, the trackers started with it as
    hyperparameters (project ``name``, logs in OUTPUT_DIR/logs).

    ``states`` are the run's own objects with ``state_dict``/``load_state_dict`` (an EMA, say),
    saved in every checkpoint beside accelerate's state, the step counter and the best
    validation loss, and loaded ``weights_only``. :meth:`steps` drives the loop; checkpoints go
    to OUTPUT_DIR/checkpoint-N every ``checkpointing_steps`` steps and at the end (the last
    ``checkpoints_total_limit`` kept); ``max_nonfinite_steps`` skipped steps in a row stop the
    run."""

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
        self.states = {"progress": self, **states}
        self.step, self.skipped, self.best = 0, False, None
        self.stop: StopRequest | None = None  # set while :meth:`steps` runs
        self.nonfinite: torch.Tensor | None = None  # this step's losses so far, on the device
        self.agreed = self.stopping = False  # this step's reduction done; SIGTERM seen
        self.guard = NonFiniteGuard(config.train.max_nonfinite_steps, self.output_dir, accelerator)
        start = resolve_resume(resume, self.output_dir)
        self.resumed = start is not None
        if start is not None:
            load_checkpoint(accelerator, start, self.states)
            accelerator.print(f"resumed from {start} at step {checkpoint_step(start)}")
        elif resume:
            accelerator.print(
                f"--resume_from_checkpoint {resume}: no checkpoint in {self.output_dir}, "
                "starting fresh"
            )
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(
                yaml.safe_dump(to_mapping(config), sort_keys=False)
            )
        accelerator.init_trackers(name, config=hyperparameters(config))

    def batches(self, dataset: Dataset):
        """This process's micro-batches of ``dataset`` from the step the run starts at
        (:func:`engine.loader.seeded_batches`, or :func:`engine.loader.stream_batches` for a
        stream, with the ``train`` section's settings)."""
        t = self.train
        make = stream_batches if isinstance(dataset, ImageStream) else seeded_batches
        return make(
            dataset,
            t.batch_size,
            t.gradient_accumulation_steps,
            t.seed,
            t.num_workers,
            self.accelerator,
            self.step,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.best = int(state["step"]), state.get("best")

    def steps(self) -> Iterator[int]:
        """Yield the number of steps done so far until ``max_steps`` are done. A step that the
        body found non-finite (:meth:`check_finite`) is taken again; a finished step is counted and
        checkpointed when due. When any process got SIGTERM, all learn it from the step's
        reduction, save a checkpoint together after that step and raise :class:`Preempted`."""
        self.stop, saved = StopRequest(), None
        self.bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc=self.name,
            disable=not self.accelerator.is_local_main_process,
        )
        try:
            while self.step < self.max_steps:
                self.skipped, self.agreed, self.nonfinite = False, False, None
                yield self.step
                if not self.agreed:  # a body that never asked: the stop flag still goes round
                    self._agree()
                if self.guard.update(not self.skipped, self.step):
                    self.step += 1
                    self.bar.update(1)
                    if (
                        self.step % self.train.checkpointing_steps == 0
                        or self.step == self.max_steps
                    ):
                        self.save()
                        saved = self.step
                if self.stopping and self.step < self.max_steps:
                    where = None if saved == self.step else self.save()
                    raise Preempted(
                        f"stopped by SIGTERM at step {self.step}"
                        + (f"; checkpoint saved in {where}" if where else "")
                        + "; continue with --resume_from_checkpoint latest"
                    )
        except Preempted:
            self.accelerator.end_training()  # flush the logs
            raise
        finally:
            self.stop.close()
            self.bar.close()

    def check_finite(self, *losses: torch.Tensor) -> bool:
        """Call after ``backward`` in every micro-batch, before the optimizer steps: whether the
        step may be taken. Before the last micro-batch of a step it only notes (on the device)
        whether ``losses`` are finite and says True (the optimizer does not step then); at the
        last it makes the step's one reduction, and so its one wait for the device: False, on
        every process, when any process saw a non-finite loss in this step, and ``skipped`` set
        for the rest of the step. Then the step is skipped everywhere (zero the gradients; all
        must agree, or the collectives of the next step would deadlock)."""
        for loss in losses:
            bad = ~torch.isfinite(loss.detach()).all()
            self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        if not self.accelerator.sync_gradients:
            return True
        self._agree()
        return not self.skipped

    def _agree(self) -> None:
        """The step's reduction: whether any process saw a non-finite loss or got SIGTERM."""
        flags = torch.zeros(2, device=self.accelerator.device)
        if self.nonfinite is not None:
            flags[0] = self.nonfinite
        flags[1] = float(self.stop.flag)  # a host number: filled in, not copied
        nonfinite, stop = self.accelerator.reduce(flags, reduction="sum").tolist()
        self.skipped, self.stopping, self.agreed = nonfinite > 0, stop > 0, True
        self.nonfinite = None

    def is_due(self, every: int) -> bool:
        """Whether the step being taken ends at a multiple of ``every`` or is the last one."""
        done = self.step + 1
        return done % every == 0 or done == self.max_steps

    def log(
        self, values: dict[str, float | torch.Tensor], show: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """Log ``values`` (numbers or 0-d tensors, read from the device here, once) averaged
        over the processes at the step being taken; ``show`` names those written beside the
        progress bar. Returns the averages."""
        values = mean_over_processes(self.accelerator, values)
        self.accelerator.log(values, step=self.step + 1)
        shown = {k: f"{values[k]:.3g}" for k in show if k in values}
        if shown:
            self.bar.set_postfix(shown)
        return values

    def log_image(self, name: str, images: torch.Tensor, nrow: int) -> Path:
        """Main process: ``images`` (B×C×H×W in [0, 1]) as one grid, written to
        OUTPUT_DIR/images/<name>_<step>.png and logged to every tracker that takes images."""
        grid = make_grid(images.float().cpu(), nrow=nrow)
        path = self.output_dir / "images" / f"{name}_{self.step + 1:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({name: grid[None]}, step=self.step + 1)
        return path

    def record_validation(self, values: dict[str, float], key: str) -> bool:
        """Log the validation ``values`` (already reduced over the processes) and say whether
        ``values[key]`` is the lowest so far (kept in the checkpoints, so a resumed run
        compares with the best before it stopped)."""
        self.accelerator.log(values, step=self.step + 1)
        if self.best is not None and not values[key] < self.best:
            return False
        self.best = float(values[key])
        self.accelerator.print(f"step {self.step + 1}: best {key} so far, {self.best:.4g}")
        return True

    def save(self) -> Path:
        """A checkpoint of the steps done, written by every process together."""
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.step,
            self.train.checkpoints_total_limit,
            self.states,
        )
