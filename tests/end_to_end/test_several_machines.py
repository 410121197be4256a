"""Issue 18: two single-process "machines" on the loopback (``accelerate launch --num_machines 2
--machine_rank i --main_process_ip 127.0.0.1``), each with its own HOME and data-listing cache,
train both stages on an image folder and resume; a folder one machine cannot see is refused at
the start, naming that machine's process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from tests.end_to_end.test_fault_tolerance import DIFFUSION_CONFIG, TOKENIZER_CONFIG
from tests.launch import ROOT

pytestmark = pytest.mark.slow  # two launches per run, both stages

PORTS = iter(range(29651, 29700))


def machines(tmp_path, script, args, per_machine=None):
    """Both machines of one run, to the end: their logs, each asserted to have exited 0 unless
    ``per_machine`` gives machine 1 other arguments (then their exit codes are returned too)."""
    port, runs = next(PORTS), []
    for rank in (0, 1):
        home = tmp_path / f"machine{rank}"
        home.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "ACCELERATE_USE_CPU": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "HOME": str(home),
            "NEVERCOLLAPSE_DATA_CACHE": str(home / "data-cache"),  # listings are per machine
        }
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        cmd += ["--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2"]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / script)]
        cmd += (per_machine or {}).get(rank, args)
        log = (home / f"{script.split('/')[-1]}-{port}.log").open("w")
        runs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log))
    codes = [run.wait(timeout=600) for run in runs]
    logs = [
        (tmp_path / f"machine{r}" / f"{script.split('/')[-1]}-{port}.log").read_text()
        for r in (0, 1)
    ]
    if per_machine is None:
        assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return logs, codes


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "images"
    for i in range(40):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (i * 6, 255 - i * 6, (i % 2) * 255)).save(folder / f"{i}.png")
    return root


def config(tmp_path, name, base, **train):
    data = json.loads(json.dumps(base))
    data["train"].update(train)
    data["data"] = {"resolution": 16, "validation_size": 4}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_two_machines_train_both_stages_and_resume(tmp_path, images):
    out = tmp_path / "run"
    tok = config(tmp_path, "tok", TOKENIZER_CONFIG, max_steps=2, checkpointing_steps=1)
    common = ["--config", str(tok), "--output_dir", str(out), f"data.source={images}"]
    logs, _ = machines(tmp_path, "scripts/train_tokenizer.py", common)
    assert "weights identical on all 2 processes" in logs[0]
    assert all(any((tmp_path / f"machine{r}" / "data-cache").iterdir()) for r in (0, 1))
    logs, _ = machines(
        tmp_path,
        "scripts/train_tokenizer.py",
        [*common, "train.max_steps=3", "--resume_from_checkpoint", "latest"],
    )
    assert "at step 2" in logs[0] and (out / "checkpoint-3").is_dir()

    dif = config(tmp_path, "dif", DIFFUSION_CONFIG, max_steps=2, checkpointing_steps=1)
    stage_two = ["--config", str(dif), "--tokenizer", str(out / "tokenizer")]
    stage_two += ["--output_dir", str(tmp_path / "dif"), "data.resolution=16"]
    logs, _ = machines(tmp_path, "scripts/train_diffusion.py", stage_two)
    assert f"the tokenizer's training data, '{images}'" in logs[0]  # the folder, not digits
    logs, _ = machines(
        tmp_path,
        "scripts/train_diffusion.py",
        [*stage_two, "train.max_steps=3", "--resume_from_checkpoint", "latest"],
    )
    assert "at step 2" in logs[0] and (tmp_path / "dif" / "pipeline" / "model_index.json").is_file()


def test_a_folder_one_machine_cannot_see_is_refused_at_the_start(tmp_path, images):
    tok = config(tmp_path, "tok", TOKENIZER_CONFIG, max_steps=2)
    args = ["--config", str(tok), f"data.source={images}", "--output_dir"]
    # machine 1 sees another folder at that path: as a node-local disk would be
    logs, codes = machines(
        tmp_path,
        "scripts/train_tokenizer.py",
        None,
        {0: [*args, str(tmp_path / "run")], 1: [*args, str(tmp_path / "elsewhere")]},
    )
    assert codes == [1, 1]
    message = "the output folder " + str(tmp_path / "run")
    assert message in logs[0] and "is not shared by every process: process 1 on " in logs[0]
    assert not (tmp_path / "run" / "checkpoint-1").exists()
