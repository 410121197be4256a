"""The ``waits`` family: what a training step waits for (device reads and collectives per step,
counted by scripts/count_waits.py on two CPU processes), for both stages."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, row, skipped


def bench_waits(args, device, folder: str | Path | None = None) -> list[dict]:
    """Device reads and collectives per training step (scripts/count_waits.py) on two CPU
    processes: the digits LooC tokenizer in bf16 with 2 micro-batches per step and the
    discriminator on, then the class-conditional UNet on its latents. The counts do not depend
    on the device; the middle steps are shown (not the first, nor the last, which logs). The runs
    write into ``folder`` (default: a temporary one): ``folder/<stage>/waits-<rank>.json``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", "29655"]
    common = ["--steps", "4", "train.batch_size=4", "train.mixed_precision=bf16"]
    common += ["train.gradient_accumulation_steps=2", "data.validation_size=8"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(folder or scratch)
        stages = {
            "tokenizer": ["--config", "configs/tokenizer/digits_looc.yaml", "loss.disc_start=0"],
            "diffusion": [
                "--config",
                "configs/diffusion/digits_cond.yaml",
                "--tokenizer",
                f"{tmp}/tokenizer/tokenizer",
            ],
        }
        for stage, extra in stages.items():
            out = f"{tmp}/{stage}"
            command = [*launch, "scripts/count_waits.py", stage, "--output_dir", out]
            start = time.perf_counter()
            done = subprocess.run(
                [*command, *common, *extra], cwd=ROOT, env=env, capture_output=True, text=True
            )
            seconds = time.perf_counter() - start
            setting = f"{extra[1]}, 2 processes, bf16, 2 micro-batches per step"
            if done.returncode != 0:
                rows.append(skipped("waits", f"{stage} step", setting, "failed: see stderr"))
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            middle = json.loads(Path(out, "waits-1.json").read_text())[1:-1]
            host = "torch/optim/optimizer.py:_get_value"  # Adam's step counters, on the host
            reads = max(sum(n for p, n in r["reads"].items() if host not in p) for r in middle)
            collectives = max(sum(r["collectives"].values()) for r in middle)
            places = sorted({p.split(" → ")[0] for r in middle for p in r["collectives"]})
            rows.append(
                row(
                    "waits",
                    f"{stage} step: device reads / collectives (time: the whole counted run)",
                    setting,
                    seconds,
                    None,
                    len(middle) + 2,
                    "steps/s (counted, whole run)",
                    f"{reads} read(s), {collectives} collective(s) per step ({', '.join(places)})",
                )
            )
    return rows
