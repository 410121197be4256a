"""accelerate owns the runtime: precision, accumulation and the tracker come from the launcher
unless the recipe sets them (then the recipe wins, with one warning line); checkpoints are named
and kept as in diffusers' training examples."""

from dataclasses import dataclass

import pytest
import torch
import yaml
from accelerate import Accelerator

from engine.accelerator import start_accelerator
from engine.checkpoints import CheckpointError, resolve_resume, save_checkpoint
from engine.run import hyperparameters
from engine.run_config import RunConfig
from tests.launch import ROOT, launch
from tests.tokenizer.test_train_tokenizer import write_config

SCRIPT = ROOT / "scripts" / "train_tokenizer.py"


def run_launched(tmp_path, launcher, env=None, **recipe):
    config = write_config(tmp_path / "tiny.yaml", train__max_steps=1, **recipe)
    out = tmp_path / "run"
    done = launch(
        SCRIPT, "--config", str(config), "--output_dir", str(out), launcher=launcher, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return yaml.safe_load((out / "config.yaml").read_text())["train"], done.stderr


def test_the_launcher_decides_what_the_recipe_leaves_open(tmp_path):
    train, stderr = run_launched(
        tmp_path,
        ("--mixed_precision", "bf16"),
        env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"},
        train__gradient_checkpointing=True,  # exercised here, in bf16
    )
    assert train["mixed_precision"] == "bf16" and train["gradient_accumulation_steps"] == 2
    assert "overrides the launcher" not in stderr


def test_the_recipe_wins_over_the_launcher_with_one_warning_line(tmp_path):
    train, stderr = run_launched(
        tmp_path,
        ("--mixed_precision", "bf16"),
        env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"},
        train__mixed_precision="no",
        train__gradient_accumulation_steps=1,
    )
    assert train["mixed_precision"] == "no" and train["gradient_accumulation_steps"] == 1
    lines = [line for line in stderr.splitlines() if "overrides the launcher" in line]
    assert len(lines) == 2, stderr[-2000:]
    assert "train.mixed_precision=no" in lines[0] and "--mixed_precision bf16" in lines[0]
    assert "train.gradient_accumulation_steps=1" in lines[1] and "steps 2" in lines[1]


def train_section(**keys):
    return RunConfig(**keys)


def test_report_to_chooses_the_trackers(tmp_path, monkeypatch):
    for key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        monkeypatch.delenv(key, raising=False)
    accelerator = start_accelerator(train_section(report_to="none"), tmp_path)
    assert accelerator.log_with == [] and accelerator.mixed_precision == "no"
    accelerator = start_accelerator(train_section(), tmp_path)
    assert [str(t) for t in accelerator.log_with] == ["tensorboard"]
    with pytest.raises(ImportError, match="report_to=wandb.*pip install wandb"):
        start_accelerator(train_section(report_to="wandb"), tmp_path)
    with pytest.raises(ValueError, match="train.report_to.*choose one of"):
        train_section(report_to="tensorbored")


def test_hyperparameters_are_flat_scalars_trackers_accept():
    @dataclass
    class Config:
        model: dict
        train: RunConfig

    config = Config({"ch_mult": [1, 2], "quantizer": "cvq"}, RunConfig(adam_betas=(0.5, 0.9)))
    flat = hyperparameters(config)
    assert flat["train.adam_betas"] == "[0.5, 0.9]" and flat["model.ch_mult"] == "[1, 2]"
    assert flat["train.learning_rate"] == 1e-4 and flat["train.mixed_precision"] == "null"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    return accelerator


def test_checkpoints_are_named_and_kept_as_in_diffusers(tmp_path, accelerator):
    for step in (5, 10, 15):
        save_checkpoint(accelerator, tmp_path, step, keep=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10",
        "checkpoint-15",
        "checkpoint-5",
    ]
    save_checkpoint(accelerator, tmp_path, 20, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15", "checkpoint-20"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-20"
    assert resolve_resume("checkpoint-15", tmp_path) == tmp_path / "checkpoint-15"  # by name


def test_checkpoints_of_the_old_layout_are_refused_with_the_move_command(tmp_path, accelerator):
    save_checkpoint(accelerator, tmp_path / "checkpoints", 7, keep=None)
    (tmp_path / "checkpoints" / "checkpoint-7").rename(tmp_path / "checkpoints" / "step_00000007")
    with pytest.raises(CheckpointError, match=r"older layout.*mv .*step_00000007 .*checkpoint-7"):
        resolve_resume("latest", tmp_path)


def test_keys_of_older_recipes_name_their_new_names():
    from engine.config import ConfigError, load_config
    from tokenizer.train import TokenizerConfig

    with pytest.raises(ConfigError, match="checkpoint_every; renamed train.checkpointing_steps"):
        load_config(
            ROOT / "configs/tokenizer/digits_cvq.yaml",
            ["train.checkpoint_every=3"],
            TokenizerConfig,
        )


def test_allow_tf32_sets_the_backends_flags(tmp_path, monkeypatch):
    for key in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        monkeypatch.delenv(key, raising=False)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for flag in (False, True):
            start_accelerator(train_section(report_to="none", allow_tf32=flag), tmp_path)
            assert torch.backends.cuda.matmul.allow_tf32 is flag
            assert torch.backends.cudnn.allow_tf32 is flag
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
