"""Helpers for the fault-injection tests: run a training script in a forked child (imports are
already paid for, so a killed-and-resumed chain costs seconds), kill it at chosen moments, and
compare checkpoints exactly."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import runpy
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from tests.launch import ROOT, two_processes


def _child(main: Callable[[], None], argv: list[str], env: dict, log: str) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)  # same arithmetic in every run, and fork-safe
    stream = open(log, "a", buffering=1)  # replaces pytest's capture in the child
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream
    # pytest records warnings in the parent; the child prints them as a script run would
    warnings.resetwarnings()
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))
    )
    sys.argv = ["train"] + argv
    main()


def script(path: Path) -> Callable[[], None]:
    """A training script's command line, to run in a forked ``Run``."""
    return lambda: runpy.run_path(str(path), run_name="__main__")


class Run:
    """``main()`` of a training script in a forked process with ``argv``; output goes to
    ``log``."""

    def __init__(self, main, argv: list[str], log: Path, **env: str):
        self.log = log
        ctx = multiprocessing.get_context("fork")
        self.process = ctx.Process(target=_child, args=(main, argv, env, str(log)))
        self.process.start()

    def wait(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        assert self.process.exitcode is not None, f"run did not finish: {self.output()[-2000:]}"
        return self.process.exitcode

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process.is_alive()


def wait_for(condition: Callable[[], bool], run, what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert run.alive(), f"run ended before {what}: {run.output()[-3000:]}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def steps(checkpoints: Path) -> list[int]:
    """Steps of the complete (renamed) checkpoints."""
    if not checkpoints.is_dir():
        return []
    return sorted(
        int(p.name.removeprefix("checkpoint-"))
        for p in checkpoints.iterdir()
        if p.name.startswith("checkpoint-") and not p.name.endswith(".partial")
    )


def partials(checkpoints: Path) -> list[Path]:
    return sorted(checkpoints.glob("checkpoint-*.partial")) if checkpoints.is_dir() else []


def _same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold bit-identical weights, optimizer, scheduler and our own states."""
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    assert names == sorted(
        p.name for p in b.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")
    )
    assert "model.safetensors" in names and "optimizer.bin" in names
    for name in names:
        if name.endswith(".safetensors"):
            x, y = load_file(a / name), load_file(b / name)
        else:
            x, y = (torch.load(p / name, weights_only=True) for p in (a, b))
        _same(x, y, name)


# --- two real processes through accelerate launch, killable -------------------------------


def launch_two(script: Path, args: list[str], port: int, log: Path) -> Launched:
    cmd, env = two_processes(script, args, port)
    # its own session: the launcher and both workers can be killed as one group
    return Launched(
        subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
        log,
    )


class Launched:
    def __init__(self, process: subprocess.Popen, log: Path):
        self.process, self.log = process, log

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout)

    def kill_all(self) -> None:
        """SIGKILL the launcher and every worker, and wait until all are gone: torch's launcher
        starts each worker in a session of its own, out of reach of the launcher's group."""
        family = [psutil.Process(self.process.pid)]
        family += family[0].children(recursive=True)
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.process.wait(60)
        _, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, f"still running after SIGKILL: {alive}"

    def worker(self, rank: int) -> psutil.Process:
        """The worker process of ``rank`` (by its RANK environment variable)."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "python" in child.name():
                    return child
            except psutil.Error:
                continue
        raise AssertionError(f"no rank {rank} worker")
