"""One run per output folder: the run's main process holds an exclusive OS lock on
OUTPUT_DIR/.lock (``flock``: released by the operating system when the process ends, however it
ends), with the holder's host, process id, start time and command line written into the file
for the message another run gets. A run that ends (``release_folders``, which the scripts call
however training ends) empties the file; one that was killed leaves its details, and the next
run takes the lock over with a warning naming it."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from accelerate import Accelerator

from .config import ConfigError
from .distributed import main_process_decides

LOCK_FILE = ".lock"
# the folders this process holds (a trainer called again in the same process, as a notebook or a
# test does, runs after the previous run, never beside it)
_HELD: dict[Path, int] = {}


class FolderInUseError(ConfigError):
    """Another running process holds the output folder."""


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
    except ValueError:
        return "an unknown run"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
        f"{info.get('command', '')}"
    )


def lock_folder(folder: str | os.PathLike) -> None:
    """Hold ``folder``'s lock for the rest of this process, or raise :class:`FolderInUseError`
    naming the process that holds it."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(os.pread(fd, 65536, 0).decode(errors="replace"))
        os.close(fd)
        raise FolderInUseError(
            f"{folder} is in use by another run ({holder}); wait for it to end, stop it, or "
            "choose another --output_dir (two runs in one folder would overwrite each other's "
            "checkpoints and exports)"
        ) from None
    except OSError as err:  # a file system without locks: go on, but say so
        warnings.warn(
            f"{folder} cannot be locked ({err}); make sure no other run uses it", stacklevel=2
        )
        os.close(fd)
        return
    previous = os.pread(fd, 65536, 0).decode(errors="replace").strip()
    if previous:
        warnings.warn(
            f"taking over {folder / LOCK_FILE}, left by a run that ended without releasing it "
            f"(killed?): {_holder(previous)}",
            stacklevel=2,
        )
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[folder] = fd  # open until released (or this process ends): the lock with it


def release_folders() -> None:
    """Empty and release every lock this process holds."""
    for folder, fd in list(_HELD.items()):
        os.ftruncate(fd, 0)
        os.close(fd)
        del _HELD[folder]


def lock_output_dir(accelerator: Accelerator, output_dir: str | os.PathLike) -> None:
    """The run's main process takes ``output_dir``'s lock (:func:`lock_folder`); every process
    raises the same :class:`FolderInUseError` if another run holds it."""
    main_process_decides(accelerator, lambda: lock_folder(output_dir))
