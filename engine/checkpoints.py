"""Atomic, verified, resumable training checkpoints on top of ``accelerator.save_state``.

Checkpoints are ``OUTPUT_DIR/checkpoint-N`` folders (N the steps done), as in diffusers' training
examples. One is written into ``checkpoint-N.partial``, completed with a ``complete.json`` marker
that lists every file and its size, and only then renamed to ``checkpoint-N``: a run killed
mid-write leaves a ``.partial`` folder that is never picked. On resume the newest checkpoint is
verified against its marker (files present, sizes equal, safetensors headers readable, every other
state file loadable with ``weights_only``); a damaged one is passed over with a warning for the
previous complete one.

Nothing is unpickled: models are safetensors, accelerate loads the optimizer, scheduler and RNG
states with ``torch.load(weights_only=True)``, and our own states (step counter, EMA) are saved
next to them here and loaded with ``weights_only=True`` too (accelerate's
``register_for_checkpointing`` would load them with ``weights_only=False``).

Exports (the weights a run hands on: OUTPUT_DIR/tokenizer, OUTPUT_DIR/pipeline, their ``-best``)
are swapped in whole the same way, and never hold a non-finite weight (:func:`export`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import load as load_weights_only
from safetensors import safe_open

from .distributed import any_process

_NAME = re.compile(r"^checkpoint-(\d+)$")
_OLD_NAME = re.compile(r"^step_(\d{8})$")  # before diffusers' names: OUTPUT_DIR/checkpoints/
MARKER = "complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable folder) or read."""


def _damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted, or None if it is sound."""
    try:
        files = json.loads((path / MARKER).read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"unreadable {MARKER} ({e})"
    if files is None:  # written before markers listed files: nothing more to check
        return None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(file), framework="pt"):
                    pass
            elif name.endswith((".bin", ".pt", ".pkl")):
                # optimizer, scheduler, RNG and our states, as they will be loaded
                # (weights_only; accelerate itself would pass over an RNG file that fails)
                load_weights_only(file, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - whatever fails to load, the checkpoint is bad
            return f"{name} does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory`` with a marker, oldest first (not yet verified)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _refuse_old_layout(directory: Path) -> None:
    """Checkpoints of an older version (OUTPUT_DIR/checkpoints/step_XXXXXXXX) are named in
    the error with the command that moves them to today's names."""
    old = directory / "checkpoints"
    found = sorted(p for p in old.iterdir() if _OLD_NAME.match(p.name)) if old.is_dir() else []
    if found and not complete_checkpoints(directory):
        moves = "; ".join(
            f"mv {p} {directory / f'checkpoint-{int(_OLD_NAME.match(p.name).group(1))}'}"
            for p in found
        )
        raise CheckpointError(
            f"{old} holds checkpoints in an older layout ({found[-1].name}); checkpoints are now "
            f"OUTPUT_DIR/checkpoint-N. Move them, then resume: {moves}"
        )


def resolve_resume(resume: str | None, directory: Path) -> Path | None:
    """``None`` → no resume; ``"latest"`` → newest sound checkpoint in ``directory`` (a damaged
    one is skipped with a warning; None if there is none); otherwise a checkpoint folder, given
    as a path or as its name in ``directory`` (``checkpoint-500``), which must be complete and
    sound."""
    if not resume:
        return None
    _refuse_old_layout(directory)
    if resume == "latest":
        for path in reversed(complete_checkpoints(directory)):
            problem = _damage(path)
            if problem is None:
                return path
            warnings.warn(
                f"checkpoint {path} is damaged: {problem}; trying the previous one", stacklevel=2
            )
        return None
    path = Path(resume)
    if not path.exists() and (directory / resume).exists():
        path = directory / resume
    if not (path / MARKER).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume}: not a complete checkpoint folder (no "
            f"{MARKER}); use --resume_from_checkpoint latest or one of "
            f"{[p.name for p in complete_checkpoints(directory)]}"
        )
    problem = _damage(path)
    if problem:
        raise CheckpointError(
            f"--resume_from_checkpoint {resume}: damaged checkpoint, {problem}; use "
            "--resume_from_checkpoint latest to take the newest sound one"
        )
    return path


def _check_shapes(accelerator: Accelerator, path: Path) -> None:
    """The checkpoint's models must be this run's: the first tensor whose name or shape differs
    is named (a resume into another architecture), before anything is loaded."""
    for i, model in enumerate(accelerator._models):
        file = path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not file.is_file():
            continue
        with safe_open(str(file), framework="pt") as saved:
            shapes = {k: list(saved.get_slice(k).get_shape()) for k in saved.keys()}
        here = {k: list(v.shape) for k, v in accelerator.unwrap_model(model).state_dict().items()}
        for name in [*here, *shapes]:
            if shapes.get(name) != here.get(name):
                config = path.parent / "config.yaml"
                raise CheckpointError(
                    f"{path} holds another architecture than this run builds: {name} is "
                    f"{shapes.get(name, 'absent')} there, {here.get(name, 'absent')} here; "
                    f"resume with the config the run was started with ({config}), or start a "
                    "new --output_dir"
                )


def load_checkpoint(accelerator: Accelerator, path: Path, states: dict[str, Any]) -> None:
    """Load a checkpoint written by ``save_checkpoint`` (all processes)."""
    if list(path.glob("custom_checkpoint_*.pkl")):
        raise CheckpointError(
            f"{path} was written by an older version that pickled its step "
            "counter; pickles are never loaded. Start a fresh run."
        )
    _check_shapes(accelerator, path)
    accelerator.load_state(str(path))  # models: safetensors; the rest: weights_only=True
    for name, obj in states.items():
        obj.load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))
        if hasattr(obj, "to"):  # the EMA's shadow weights go back where the model is
            obj.to(accelerator.device)


def _fail_together(
    accelerator: Accelerator, error: OSError | None, partial: Path, directory: Path, step: int
) -> None:
    """Every process must learn of a failure on any, or the next collective would hang: all
    raise ``CheckpointError`` and the half-written folder goes."""
    if any_process(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(_write_error(directory, step, error))


def save_checkpoint(
    accelerator: Accelerator,
    directory: Path,
    step: int,
    keep: int | None,
    states: dict[str, Any] | None = None,
) -> Path:
    """Save the full training state plus ``states`` (objects with ``state_dict``, identical on
    every process) as ``directory/checkpoint-<step>`` and keep the newest ``keep`` checkpoints
    (None: all); all processes must call this. A
    failed write (disk full, unwritable folder) removes the ``.partial`` folder, leaves the
    previous checkpoints alone and raises ``CheckpointError`` on every process."""
    final = directory / f"checkpoint-{step}"
    partial = directory / f"checkpoint-{step}.partial"
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = e
    accelerator.wait_for_everyone()
    if error is None:
        try:
            accelerator.save_state(str(partial))
            if accelerator.is_main_process:
                for name, obj in (states or {}).items():
                    torch.save(obj.state_dict(), partial / f"{name}.pt")
        except OSError as e:
            error = e
    _fail_together(accelerator, error, partial, directory, step)
    if accelerator.is_main_process:
        try:
            _pause_for_tests()
            files = {p.name: p.stat().st_size for p in partial.iterdir() if p.is_file()}
            (partial / MARKER).write_text(json.dumps({"step": step, "files": files}))
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)  # atomic: ``final`` is either absent or complete
        except OSError as e:
            error = e
    _fail_together(accelerator, error, partial, directory, step)
    if accelerator.is_main_process and keep is not None:
        for old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_error(directory: Path, step: int, error: OSError | None) -> str:
    cause = (
        f"{error.strerror or error} ({getattr(error, 'filename', None) or directory})"
        if error is not None
        else "it failed on another process"
    )
    previous = complete_checkpoints(directory)
    kept = (
        f"the previous checkpoint {previous[-1]} is intact"
        if previous
        else "no earlier checkpoint exists"
    )
    return (
        f"could not write the step {step} checkpoint in {directory}: {cause}; {kept}. "
        "Free disk space or choose a writable --output_dir, then use "
        "--resume_from_checkpoint latest."
    )


def _pause_for_tests() -> None:
    """Tests set NEVERCOLLAPSE_TEST_CHECKPOINT_PAUSE (seconds) to kill a run while the
    ``.partial`` folder is fully written but not yet marked complete."""
    pause = os.environ.get("NEVERCOLLAPSE_TEST_CHECKPOINT_PAUSE")
    if pause:
        time.sleep(float(pause))


def checkpoint_step(path: Path) -> int:
    return json.loads((path / MARKER).read_text())["step"]


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
