"""Atomic, resumable training checkpoints on top of ``accelerator.save_state``.

A checkpoint is written into ``step_XXXXXXXX.partial``, completed with a ``complete.json`` marker,
and only then renamed to ``step_XXXXXXXX``: a run killed mid-write leaves a ``.partial`` folder
that is never picked, so ``latest`` is always a complete checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_NAME = re.compile(r"^step_(\d{8})$")
MARKER = "complete.json"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(resume: str | None, directory: Path) -> Path | None:
    """``None`` → no resume; ``"latest"`` → newest complete checkpoint (or None if there is
    none); otherwise a checkpoint folder, which must be complete."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no "
                                f"{MARKER}); use --resume latest or one of "
                                f"{[p.name for p in complete_checkpoints(directory)]}")
    return path


def save_checkpoint(accelerator: Accelerator, directory: Path, step: int, keep: int) -> Path:
    """Save the full training state (all processes must call this) and keep the newest
    ``keep`` checkpoints."""
    final = directory / f"step_{step:08d}"
    partial = directory / f"step_{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / MARKER).write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_step(path: Path) -> int:
    return json.loads((path / MARKER).read_text())["step"]
