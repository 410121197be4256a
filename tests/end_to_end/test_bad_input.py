"""Issue 18, tried as a user would: options and overrides in any order, a validation size that
leaves nothing to train on, a resume into another architecture, a replaced state file of a
checkpoint, non-finite weights never exported, and the data the user meant (a folder's own
validation split; stage two reading the tokenizer's images)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from PIL import Image

from engine.checkpoints import CheckpointError, export, resolve_resume
from engine.run import NonFiniteGuard
from tests.end_to_end.test_fault_tolerance import TOKENIZER_CONFIG, write
from tests.launch import ROOT

pytestmark = pytest.mark.slow  # training scripts as subprocesses


def train(*args, ok=True):
    done = subprocess.run(
        [sys.executable, "scripts/train_tokenizer.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (done.returncode == 0) == ok, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_overrides_before_options_and_a_validation_size_too_large(tmp_path):
    config = write(tmp_path / "c.yaml", TOKENIZER_CONFIG, max_steps=1, checkpointing_steps=1)
    out = train("--config", config, "train.batch_size=2", "--output_dir", tmp_path / "r")
    assert "tokenizer exported" in out
    out = train(
        "--config", config, "data.validation_size=1797", "--output_dir", tmp_path / "v", ok=False
    )
    assert last_line(out).startswith("error: data.validation_size = 1797 leaves no training")
    assert "Traceback" not in out and not (tmp_path / "v" / "checkpoint-1").exists()


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run of two steps with a checkpoint after each: (its config, its folder)."""
    tmp = tmp_path_factory.mktemp("two_steps")
    config = write(tmp / "c.yaml", TOKENIZER_CONFIG, max_steps=2, checkpointing_steps=1)
    train("--config", config, "--output_dir", tmp / "r")
    return config, tmp / "r"


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "r")
    return tmp_path / "r"


def test_resume_into_another_architecture_names_the_first_tensor(tmp_path, two_steps):
    config, run = two_steps[0], copy_of(two_steps[1], tmp_path)
    out = train(
        "--config",
        config,
        "model.ch=16",
        "train.max_steps=3",
        "--output_dir",
        run,
        "--resume_from_checkpoint",
        "latest",
        ok=False,
    )
    line = last_line(out)
    assert (
        "holds another architecture than this run builds: encoder.conv_in.weight is [8, 3, " in line
    )
    assert "[16, 3, 3, 3] here; resume with the config the run was started with" in line
    assert "Traceback" not in out


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "progress.pt"])
def test_a_state_file_that_does_not_load_marks_the_checkpoint_damaged(tmp_path, two_steps, name):
    config, run = two_steps[0], copy_of(two_steps[1], tmp_path)
    state = run / "checkpoint-2" / name
    size = state.stat().st_size
    # replaced by a pickle that runs code, of the same size (the marker's check passes)
    evil = b"cos\nsystem\n(S'touch pwned'\ntR." + b" " * size
    state.write_bytes(evil[:size])
    with pytest.warns(UserWarning, match=rf"checkpoint-2 is damaged: {name} does not load"):
        assert resolve_resume("latest", run).name == "checkpoint-1"
    with pytest.raises(CheckpointError, match=rf"{name} does not load"):
        resolve_resume("checkpoint-2", run)
    if name == "random_states_0.pkl":  # the run itself: back to the step 1 checkpoint
        out = train(
            "--config",
            config,
            "train.max_steps=3",
            "--output_dir",
            run,
            "--resume_from_checkpoint",
            "latest",
        )
        assert "checkpoint-1 at step 1" in out and "damaged" in out
    assert not (ROOT / "pwned").exists()


def test_non_finite_weights_are_never_exported_and_the_stop_names_what_exists(tmp_path):
    weights = {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}
    with pytest.raises(FloatingPointError, match=r"1 of 2 tensors.*NaN or inf.*b\)"):
        export(tmp_path / "tokenizer", lambda folder: folder.mkdir(), weights)
    assert not (tmp_path / "tokenizer").exists()

    class Quiet:
        def print(self, *args):
            pass

    guard = NonFiniteGuard(1, tmp_path, Quiet())
    with pytest.raises(FloatingPointError, match="no checkpoint was written before them"):
        guard.update(False, 3)


def test_a_folders_validation_split_is_the_held_out_part(tmp_path):
    for split, count in (("train", 24), ("validation", 6)):
        for i in range(count):
            folder = tmp_path / "images" / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (i * 9, 0, 0)).save(folder / f"{i}.png")
    config = write(tmp_path / "c.yaml", TOKENIZER_CONFIG, max_steps=1, checkpointing_steps=1)
    out = train(
        "--config",
        config,
        "--output_dir",
        tmp_path / "r",
        f"data.source={tmp_path / 'images'}",
        "data.validation_size=0.5",
    )
    assert "split 'train' for training (24 images), split 'validation' held out for " in out
    assert "(6 images)" in out
    recorded = json.loads((tmp_path / "r" / "tokenizer" / "config.json").read_text())
    assert recorded["training_data"]["source"] == str(tmp_path / "images")


def test_stage_two_reads_the_tokenizers_images_unless_told_otherwise(tmp_path):
    from diffusion.train import DiffusionConfig, data_of_tokenizer
    from engine.config import from_mapping

    recipe = yaml.safe_load((ROOT / "configs/diffusion/digits_uncond.yaml").read_text())
    config = from_mapping(DiffusionConfig, recipe)

    class Tokenizer:  # what data_of_tokenizer reads of a tokenizer
        config = {
            "training_data": {
                "source": "/data/mine",
                "split": "train",
                "dataset_config_name": None,
                "image_column": "image",
                "label_column": None,
                "validation_size": 20,
                "seed": 3,
            }
        }

    data, note = data_of_tokenizer(config.data, Tokenizer())
    assert (data.source, data.validation_size, data.seed) == ("/data/mine", 20, 3)
    assert "the tokenizer's training data, '/data/mine'" in note
    recipe["data"]["source"] = "digits"  # named: kept, and the difference said
    given = from_mapping(DiffusionConfig, recipe).data
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data, note = data_of_tokenizer(given, Tokenizer())
    assert data.source == "digits" and note == ""
    assert "but the tokenizer was trained on '/data/mine'" in str(seen[0].message)
