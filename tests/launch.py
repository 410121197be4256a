"""Start a script in two real CPU processes with accelerate (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(script: Path, *args: str, launcher: tuple[str, ...] = (), env: dict | None = None):
    """``accelerate launch [launcher flags] script args`` in one CPU process; the completed
    process (stdout, stderr) whatever its exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    cmd += ["--num_machines", "1", "--dynamo_backend", "no", *launcher, str(script), *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def two_processes(script: Path, args, port: int) -> tuple[list[str], dict]:
    """The command and environment that start ``script`` in two CPU processes (gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # `--cpu --num_processes 2` would silently start one process; --multi_gpu with
    # ACCELERATE_USE_CPU=1 starts two CPU processes over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", str(port), str(script), *args]
    return cmd, env


def launch_two_processes(script: Path, *args: str, timeout: int = 600, port: int = 29533):
    cmd, env = two_processes(script, args, port)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
