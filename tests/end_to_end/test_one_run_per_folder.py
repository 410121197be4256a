"""Issue 18: two runs on one output folder (a requeued job while the old one still runs) — the
second is refused naming the first; a lock left by a killed run is taken over with a warning;
for both trainers."""

from __future__ import annotations

import json
import os
import signal

import pytest

from engine.lock import LOCK_FILE
from tests.end_to_end.test_fault_tolerance import (
    DIFFUSION_CONFIG,
    TOKENIZER_CONFIG,
    diffusion_main,
    tokenizer_dir,  # noqa: F401 - the diffusion run's tokenizer (a fixture)
    tokenizer_main,
    write,
)
from tests.faults import Run, wait_for

pytestmark = pytest.mark.slow  # processes started and killed


@pytest.mark.parametrize("stage", ["tokenizer", "diffusion"])
def test_a_second_run_on_the_folder_is_refused_and_a_killed_ones_lock_taken_over(
    stage, tmp_path, request
):
    if stage == "tokenizer":
        main, config = tokenizer_main, TOKENIZER_CONFIG
        extra = []
    else:
        main, config = diffusion_main, DIFFUSION_CONFIG
        extra = ["--tokenizer", str(request.getfixturevalue("tokenizer_dir"))]
    out = tmp_path / "run"
    long = write(tmp_path / "long.yaml", config, max_steps=100000, checkpointing_steps=2)
    first = Run(main, ["--config", str(long), "--output-dir", str(out), *extra], tmp_path / "a")
    lock = out / LOCK_FILE
    wait_for(lambda: (out / "checkpoint-2").is_dir(), first, "the first run's checkpoint")
    holder = json.loads(lock.read_text())
    assert holder["pid"] == first.process.pid

    short = write(tmp_path / "short.yaml", config, max_steps=3)
    argv = ["--config", str(short), "--output-dir", str(out), *extra]
    second = Run(main, [*argv, "--resume_from_checkpoint", "latest"], tmp_path / "b")
    assert second.wait() != 0
    assert f"is in use by another run (pid {first.process.pid} on" in second.output()
    assert first.alive(), "the refused run touched the running one"

    os.kill(first.process.pid, signal.SIGKILL)  # killed: its lock file keeps its details
    first.wait()
    third = Run(main, [*argv, "--resume_from_checkpoint", "latest"], tmp_path / "c")
    assert third.wait() == 0, third.output()[-3000:]
    assert f"left by a run that ended without releasing it (killed?): pid {first.process.pid}" in (
        third.output()
    )
    assert lock.read_text() == ""  # released when the run ended
    fourth = Run(main, [*argv, "--resume_from_checkpoint", "latest"], tmp_path / "d")
    assert fourth.wait() == 0 and "taking over" not in fourth.output()
