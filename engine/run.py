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
                if not run.finite(loss):   # every process skips the step together
                    optimizer.zero_grad()
                    break
                optimizer.step(); optimizer.zero_grad()
        if run.skipped:
            continue
        if run.due(config.train.log_every):
            run.log({"loss": loss.detach()})  # read from the device at logging steps only

Outside logging, validation and checkpoint steps a step waits for the device once and makes
one collective of its own (:meth:`Run.finite`: the non-finite and SIGTERM flags together).

Also here: the seeded, resumable batch order, the precision check and what the scripts report
in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    LoggerType,
    ProjectConfiguration,
    set_seed,
)
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from .checkpoints import (
    CheckpointError,
    checkpoint_step,
    complete_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from .config import ConfigError, check_types, require, to_mapping
from .data import UnreadableImageError
from .distributed import check_shared_folder, mean_over_processes
from .lock import lock_output_dir, release_folders
from .streaming import ImageStream, stream_batches


class EpochBatches:
    """The batch sampler of :func:`seeded_batches`: each iteration yields this process's
    micro-batches of the next epoch (the first one from ``start_step`` on), lists of indices, or
    of (index, augmentation seed) pairs for a dataset whose class sets ``seeded_items``, so that
    an item's augmentation depends on (seed, epoch, item) only, not on the worker or process
    that loads it. An epoch is claimed when its first batch is drawn: a DataLoader's first
    iterator calls ``iter`` twice and uses the second."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        accumulation: int,
        seed: int,
        accelerator: Accelerator,
        start_step: int = 0,
    ) -> None:
        self.length, self.batch_size, self.seed = len(dataset), batch_size, seed
        self.seeded = bool(getattr(dataset, "seeded_items", False))
        self.processes, self.rank = accelerator.num_processes, accelerator.process_index
        self.per_step = batch_size * self.processes
        self.per_epoch = self.length // self.per_step
        if self.per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={batch_size} × {self.processes} "
                f"processes is larger than the {self.length} training items"
            )
        self.epoch, self.skip = divmod(start_step * accumulation, self.per_epoch)

    def __iter__(self) -> Iterator[list]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        # a private generator: drawing the order must not consume the global RNG stream
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.length, generator=generator)[: self.per_epoch * self.per_step]
        # each process takes every N-th sample of a global batch; batches are made as the loader
        # asks for them: no Python list of the epoch's indices
        mine = order.view(self.per_epoch, self.per_step)[skip:, self.rank :: self.processes]
        # an item's augmentation seed is a function of (seed, epoch, item): no second array
        base = (self.seed * 100_003 + epoch) * 2**31 % 2**62  # + item: a valid torch seed
        for batch in mine.reshape(-1, self.batch_size):
            indices = batch.tolist()
            yield [(i, base + i) for i in indices] if self.seeded else indices


def seeded_batches(
    dataset: Dataset,
    batch_size: int,
    accumulation: int,
    seed: int,
    num_workers: int,
    accelerator: Accelerator,
    start_step: int = 0,
):
    """Endless per-process micro-batches in a seeded per-epoch order (:class:`EpochBatches`),
    from one DataLoader whose workers persist across epochs; starting at ``start_step`` skips
    exactly the micro-batches already consumed, without loading them, so a resumed run sees the
    same data."""
    sampler = EpochBatches(dataset, batch_size, accumulation, seed, accelerator, start_step)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # a private generator: the workers' seeds must not consume the global RNG stream
        generator=torch.Generator().manual_seed(seed),
        pin_memory=accelerator.device.type == "cuda",
    )
    while True:
        yield from loader  # one epoch per pass


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


@dataclass
class RunConfig:
    """The ``train`` keys both trainers share (each trainer's ``train`` section adds its own).

    max_steps: optimizer steps to train for.
    batch_size: items per process per micro-batch.
    learning_rate: the optimizer's learning rate; scale_lr multiplies it by batch_size ×
      gradient_accumulation_steps × processes (taming-transformers' and LDM's rule).
    adam_betas: the optimizer's betas.
    max_grad_norm: clip the trained model's gradient norm to this (null: no clipping).
    gradient_accumulation_steps, mixed_precision ("no" | "fp16" | "bf16"): null (the default)
      takes them from the launcher (``accelerate launch --mixed_precision bf16``, ``accelerate
      config``); a value here wins over the launcher's, with a warning when they differ.
    gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more
      time), as diffusers' ``enable_gradient_checkpointing``.
    allow_tf32: TF32 matrix products and convolutions on Ampere and later GPUs (diffusers'
      ``--allow_tf32``; the quantizer's search stays exact float32 either way).
    seed: seeds weights, data order and every random draw; a resumed run continues the stream.
    num_workers: DataLoader worker processes.
    report_to: the tracker, as in diffusers' examples: "tensorboard", "wandb", any other
      accelerate tracker, "all" (every installed one) or "none"; logs in OUTPUT_DIR/logs, the
      resolved config as the run's hyperparameters.
    log_every: steps between logged training losses.
    validation_steps: steps between validation losses on held-out data (and at the end); the
      best one's export is kept in OUTPUT_DIR/<export>-best beside the last.
    validation_size: at most this many held-out items per validation.
    checkpointing_steps: steps between checkpoints (OUTPUT_DIR/checkpoint-N), atomic and
      verified; ``--resume_from_checkpoint latest`` continues from the newest sound one.
    checkpoints_total_limit: how many checkpoints to keep (null: all).
    max_nonfinite_steps: a non-finite loss skips its step; this many in a row stop the run.
    init_from: start from exported weights (fine-tuning): a trainer-specific folder, see its
      ``train`` section; ignored when the run resumes from a checkpoint.
    """

    max_steps: int = 10000
    batch_size: int = 8
    learning_rate: float = 1e-4
    scale_lr: bool = False
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = None
    gradient_accumulation_steps: int | None = None
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    seed: int = 0
    num_workers: int = 0
    report_to: str = "tensorboard"
    log_every: int = 10
    validation_steps: int = 1000
    validation_size: int = 256
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int | None = 3
    max_nonfinite_steps: int = 5
    init_from: str | None = None

    def __post_init__(self):
        check_types(self, "train")
        for key in (
            "max_steps",
            "batch_size",
            "log_every",
            "validation_steps",
            "validation_size",
            "checkpointing_steps",
            "max_nonfinite_steps",
        ):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        for key in ("gradient_accumulation_steps", "checkpoints_total_limit"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"train.{key}", value, "must be >= 1 or null")
        require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "train.max_grad_norm",
            self.max_grad_norm,
            "must be > 0 (clip the gradient norm to it) or null (no clipping)",
        )
        require(self.seed >= 0, "train.seed", self.seed, "must be >= 0")
        require(
            self.mixed_precision in (None, "no", "fp16", "bf16"),
            "train.mixed_precision",
            self.mixed_precision,
            'choose "no", "fp16", "bf16" or null (the launcher decides)',
        )
        require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "train.adam_betas",
            self.adam_betas,
            "two numbers in [0, 1)",
        )
        require(self.num_workers >= 0, "train.num_workers", self.num_workers, "must be >= 0")
        require(
            self.report_to in REPORT_TO,
            "train.report_to",
            self.report_to,
            f"choose one of {list(REPORT_TO)}",
        )


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
        (:func:`seeded_batches`, or :func:`engine.streaming.stream_batches` for a stream, with
        the ``train`` section's settings)."""
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
        body found non-finite (:meth:`finite`) is taken again; a finished step is counted and
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

    def finite(self, *losses: torch.Tensor) -> bool:
        """Call after ``backward`` in every micro-batch, before the optimizer steps: whether the
        step may be taken. Before the last micro-batch of a step it only notes (on the device)
        whether ``losses`` are finite and says True (the optimizer does not step then); at the
        last it makes the step's one reduction, and so its one wait for the device: False, on
        every process, when any process saw a non-finite loss in this step. Then the step is
        skipped everywhere (zero the gradients; all must agree, or the collectives of the next
        step would deadlock)."""
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

    def due(self, every: int) -> bool:
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

    def validated(self, values: dict[str, float], key: str) -> bool:
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


def export(folder: Path, save: Callable[[Path], object], weights: dict[str, torch.Tensor]) -> Path:
    """``save(tmp)`` into a sibling folder, then swapped in for ``folder``: a reader never sees a
    half-written export (the previous one stays until the new one is complete). ``weights`` (what
    is saved) must be finite: weights with NaN or inf are never exported (FloatingPointError)."""
    bad = [name for name, t in weights.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise FloatingPointError(
            f"{len(bad)} of {len(weights)} tensors of the weights hold NaN or inf (e.g. "
            f"{bad[0]}): {folder} not written. Resume from an earlier checkpoint with a lower "
            "train.learning_rate (--resume_from_checkpoint checkpoint-N)"
        )
    partial, old = (folder.with_name(folder.name + suffix) for suffix in (".partial", ".old"))
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    partial.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


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
    finally:
        release_folders()
