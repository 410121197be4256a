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


def launch_two_processes(script: Path, *args: str, timeout: int = 600, port: int = 29533):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # `--cpu --num_processes 2` would silently start one process; --multi_gpu with
    # ACCELERATE_USE_CPU=1 starts two CPU processes over gloo.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(script),
        *args,
    ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
