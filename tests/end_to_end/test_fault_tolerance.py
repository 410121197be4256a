"""Issue 8: both trainers survive SIGKILL (also mid-checkpoint), SIGTERM, damaged checkpoints,
a full disk and non-finite losses; two processes stay identical and resume exactly.

Single-process runs are ``main()`` of the real scripts in forked children (the imports are paid
once), killed with real signals. Two-process runs go through ``accelerate launch``."""

from __future__ import annotations

import errno
import json
import random
import re
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from diffusion.latent_cache import LatentCache
from engine.checkpoints import CheckpointError, resolve_resume
from engine.config import from_mapping
from pipelines import ClassConditionalLatentDiffusionPipeline
from tests.conftest import TINY_TOKENIZER
from tests.faults import Run, assert_same_state, launch_two, partials, script, steps, wait_for
from tests.launch import ROOT

pytestmark = pytest.mark.slow  # processes started and killed: minutes

TOKENIZER = ROOT / "scripts" / "train_tokenizer.py"
DIFFUSION = ROOT / "scripts" / "train_diffusion.py"
MAX_STEPS = 12

TOKENIZER_CONFIG = {
    "model": {**TINY_TOKENIZER, "ch": 8, "embed_dim": 8},  # configs/tokenizer/tiny.yaml, narrower
    # the discriminator (and its optimizer) joins at step 3: its state is resumed too
    "loss": {
        "perceptual_weight": 0.0,
        "disc_weight": 0.5,
        "disc_start": 3,
        "disc_layers": 1,
        "disc_channels": 8,
    },
    "data": {"source": "digits", "resolution": 16, "validation_size": 97},
    "train": {
        "max_steps": MAX_STEPS,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "log_every": 100,
        "image_every": 100,
        "checkpointing_steps": 1,
        "checkpoints_total_limit": 2,
    },
}
DIFFUSION_CONFIG = {
    "unet": {
        "block_out_channels": [8, 8],
        "layers_per_block": 1,
        "attention_resolutions": [],
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "num_classes": 10,
    },
    "data": {"source": "digits", "resolution": 16, "validation_size": 97},
    "cache": {"shard_size": 512},
    # warm-up and EMA warm-up span the run: scheduler and EMA state must resume exactly
    "train": {
        "max_steps": MAX_STEPS,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 20,
        "ema_decay": 0.99,
        "log_every": 100,
        "sample_every": 100,
        "checkpointing_steps": 1,
        "checkpoints_total_limit": 2,
    },
}


tokenizer_main, diffusion_main = script(TOKENIZER), script(DIFFUSION)


def write(path: Path, config: dict, **train) -> Path:
    config = json.loads(json.dumps(config))
    config["train"].update(train)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    model = tiny_tokenizer(
        ch=8, quantizer="looc", quantizer_options={"num_codes": 16, "code_dim": 2}
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    model.save_pretrained(path)
    return path


def stage_args(stage: str, tmp: Path, tokenizer_dir: Path | None) -> tuple:
    if stage == "tokenizer":
        return tokenizer_main, ["--config", str(write(tmp / "t.yaml", TOKENIZER_CONFIG))]
    return diffusion_main, [
        "--config",
        str(write(tmp / "d.yaml", DIFFUSION_CONFIG)),
        "--tokenizer",
        str(tokenizer_dir),
    ]


@pytest.mark.parametrize("stage", ["tokenizer", "diffusion"])
def test_kill_and_resume_chain_matches_an_uninterrupted_run(stage, tmp_path, request):
    """One run interrupted seven times (five SIGKILLs at seeded random moments, two of them
    while a checkpoint is being written, one SIGTERM, one damaged newest checkpoint), each time
    resumed with --resume latest, ends bit-identical to one uninterrupted run."""
    tok = request.getfixturevalue("tokenizer_dir") if stage == "diffusion" else None
    main, args = stage_args(stage, tmp_path, tok)
    reference = Run(
        main, [*args, "--output-dir", str(tmp_path / "reference")], tmp_path / "reference.log"
    )
    assert reference.wait() == 0, reference.output()[-3000:]

    out = tmp_path / "run"
    ck = out
    argv = [*args, "--output-dir", str(out)]
    rng = random.Random(8)
    plan = ["kill", "kill-while-writing", "kill", "term", "kill-while-writing", "kill"]
    for i, event in enumerate(plan):
        before = max(steps(ck), default=0)
        resume = ["--resume_from_checkpoint", "latest"] if i else []
        env = {"NEVERCOLLAPSE_TEST_CHECKPOINT_PAUSE": "60"} if event == "kill-while-writing" else {}
        started = time.time()
        run = Run(main, argv + resume, tmp_path / f"{i}.log", **env)
        if event == "kill-while-writing":  # a .partial of this run, not one left by a kill
            wait_for(
                lambda: [p for p in partials(ck) if p.stat().st_mtime >= started],
                run,
                "a .partial checkpoint",
            )
            time.sleep(rng.uniform(0, 0.3))  # in save_state or in the pause before the marker
            assert partials(ck), "still writing"
            run.process.kill()
            assert run.wait() == -9
            assert max(steps(ck), default=0) == before, "an unmarked checkpoint was completed"
        else:
            wait_for(lambda: max(steps(ck), default=0) > before, run, "a new checkpoint")
            time.sleep(rng.uniform(0, 0.1))  # anywhere in the next step or checkpoint write
            if event == "kill":
                run.process.kill()
                assert run.wait() == -9
            else:
                run.process.terminate()
                assert run.wait() == 0, run.output()[-3000:]  # a clean exit
                stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", run.output())[1])
                assert stopped in steps(ck) and resolve_resume("latest", ck).name == (
                    f"checkpoint-{stopped}"
                ), "the SIGTERM checkpoint is the newest"
        assert i == 0 or "resumed from" in run.output()
        found = resolve_resume("latest", ck)
        assert found is not None and max(steps(ck)) < MAX_STEPS, "the run must still be going"
        print(
            f"{stage}: {event} during run {i} (from step {before}): latest sound checkpoint "
            f"{found.name}, exit {run.process.exitcode}"
        )

    # damage the newest complete checkpoint: resume falls back to the previous one
    newest = resolve_resume("latest", ck)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    final = Run(main, argv + ["--resume_from_checkpoint", "latest"], tmp_path / "final.log")
    assert final.wait() == 0, final.output()[-3000:]
    assert f"{newest} is damaged" in final.output()
    previous = int(newest.name.removeprefix("checkpoint-")) - 1
    assert f"at step {previous}" in final.output()

    name = f"checkpoint-{MAX_STEPS}"
    assert_same_state(tmp_path / "reference" / name, ck / name)
    assert not partials(ck)


def test_two_process_tokenizer_sigterm_then_kill_then_resume(tmp_path):
    config = write(tmp_path / "t.yaml", TOKENIZER_CONFIG, max_steps=5)
    _two_process_chain(
        TOKENIZER,
        ["--config", str(config)],
        tmp_path,
        29561,
        export="tokenizer/diffusion_pytorch_model.safetensors",
        sigterm=True,
    )


def test_two_process_diffusion_kill_then_resume(tmp_path, tokenizer_dir):
    config = write(tmp_path / "d.yaml", DIFFUSION_CONFIG, max_steps=4)
    _two_process_chain(
        DIFFUSION,
        ["--config", str(config), "--tokenizer", str(tokenizer_dir)],
        tmp_path,
        29565,
        export="pipeline/unet/diffusion_pytorch_model.safetensors",
    )
    # every process encoded its share of the cache
    assert LatentCache(tmp_path / "ref" / "latents").metadata["count"] == 1700
    pipe = ClassConditionalLatentDiffusionPipeline.from_pretrained(tmp_path / "ref" / "pipeline")
    assert pipe.num_classes == 10


def _two_process_chain(
    script: Path, args: list[str], tmp: Path, port: int, export: str, sigterm: bool = False
):
    """Two processes: an uninterrupted reference; with ``sigterm``, SIGTERM to process 1 only
    (both must stop at the same step and save together, and exit cleanly); SIGKILL of every
    process after a checkpoint; resume to the end: equal to the reference, and both processes
    hold identical weights and codebooks at the end of each finished run."""
    reference = launch_two(script, [*args, "--output-dir", str(tmp / "ref")], port, tmp / "ref.log")
    assert reference.wait() == 0, reference.output()[-3000:]
    assert "weights identical on all 2 processes" in reference.output()
    assert (tmp / "ref" / export).is_file()

    out = ck = tmp / "run"
    argv = [*args, "--output-dir", str(out)]
    if sigterm:
        port += 1
        run = launch_two(script, argv, port, tmp / "term.log")
        wait_for(lambda: steps(ck), run, "the first checkpoint")
        run.worker(1).terminate()  # a pre-emption notice reaching one process only
        assert run.wait() == 0, run.output()[-3000:]
        stopped = re.findall(r"stopped by SIGTERM at step (\d+)", run.output())
        assert stopped and int(stopped[0]) == max(steps(ck)), "saved where it stopped"
        assert not (out / export).exists(), "stopped, not finished"

    before = max(steps(ck), default=0)
    run = launch_two(
        script, argv + ["--resume_from_checkpoint", "latest"], port + 1, tmp / "kill.log"
    )
    wait_for(lambda: max(steps(ck), default=0) > before, run, "a new checkpoint")
    run.kill_all()
    with warnings.catch_warnings(record=True) as damaged:
        warnings.simplefilter("always")
        latest = resolve_resume("latest", ck)
    listing = {p.name: sorted(f.name for f in p.iterdir()) for p in ck.glob("checkpoint-*")}
    assert max(steps(ck)) < 5 and latest is not None, (listing, [str(w.message) for w in damaged])

    run = launch_two(
        script, argv + ["--resume_from_checkpoint", "latest"], port + 2, tmp / "final.log"
    )
    assert run.wait() == 0, run.output()[-3000:]
    assert "resumed from" in run.output()
    assert "weights identical on all 2 processes" in run.output()
    name = f"checkpoint-{max(steps(tmp / 'ref'))}"
    assert_same_state(tmp / "ref" / name, ck / name)


# --- in-process faults: non-finite losses, full disk -------------------------------------


def _tokenizer_recipe(tmp_path, **train):
    from tokenizer.train import TokenizerConfig

    config = json.loads(json.dumps(TOKENIZER_CONFIG))
    config["train"].update(train)
    return from_mapping(TokenizerConfig, config)


def test_tokenizer_nonfinite_losses_skip_then_stop_keeping_the_last_checkpoint(
    tmp_path, monkeypatch, capsys
):
    from tokenizer.losses import VQGANLoss
    from tokenizer.train import train_tokenizer

    original, calls = VQGANLoss.generator_loss, []

    def poisoned(self, *args, **kwargs):
        loss, logs = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3 or len(calls) >= 6:  # one NaN at step 2, from step 4 on for good
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(VQGANLoss, "generator_loss", poisoned)
    recipe = _tokenizer_recipe(tmp_path, max_nonfinite_steps=3)
    with pytest.raises(
        FloatingPointError,
        match=r"3 non-finite losses in a row at step 4.*"
        r"lower train.learning_rate.*bf16.*fp32",
    ):
        train_tokenizer(recipe, tmp_path / "run")
    printed = capsys.readouterr().out
    assert "step 2: non-finite loss, step skipped (1 in a row)" in printed
    ck = tmp_path / "run"
    assert steps(ck) == [3, 4] and not partials(ck)
    assert resolve_resume("latest", ck).name == "checkpoint-4"  # intact and sound


def test_diffusion_nonfinite_losses_skip_then_stop(tmp_path, tokenizer_dir, monkeypatch, capsys):
    import torch.nn.functional as F

    import diffusion.train as trainer

    calls = []

    def poisoned(a, b):
        calls.append(1)
        loss = F.mse_loss(a, b)
        return loss * float("inf") if len(calls) == 2 or len(calls) >= 4 else loss

    monkeypatch.setattr(trainer, "F", types.SimpleNamespace(mse_loss=poisoned))
    config = json.loads(json.dumps(DIFFUSION_CONFIG))
    config["train"].update(max_nonfinite_steps=2)
    recipe = from_mapping(trainer.DiffusionConfig, config)
    with pytest.raises(FloatingPointError, match=r"2 non-finite.*learning_rate"):
        trainer.train_diffusion(recipe, tokenizer_dir, tmp_path / "run")
    assert "step 1: non-finite loss, step skipped (1 in a row)" in capsys.readouterr().out
    ck = tmp_path / "run"
    assert steps(ck) == [1, 2] and resolve_resume("latest", ck).name == "checkpoint-2"


def test_full_disk_keeps_the_previous_checkpoint_and_names_the_cause(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from tokenizer.train import train_tokenizer

    original = Accelerator.save_state

    def fills_the_disk(self, output_dir=None, **kwargs):
        if "checkpoint-2" in str(output_dir):
            original(self, output_dir, **kwargs)  # some files land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk)
    ck = tmp_path / "run"
    with pytest.raises(CheckpointError) as error:
        train_tokenizer(_tokenizer_recipe(tmp_path), tmp_path / "run")
    message = str(error.value)
    assert "No space left on device" in message and str(ck) in message
    assert f"previous checkpoint {ck / 'checkpoint-1'} is intact" in message
    assert "--resume_from_checkpoint latest" in message
    assert steps(ck) == [1] and not partials(ck), "the .partial folder is cleaned up"
    assert resolve_resume("latest", ck).name == "checkpoint-1"


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    from accelerate import Accelerator

    from engine.checkpoints import save_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    blocked = tmp_path / "file"
    blocked.write_text("a file where the output folder should be")
    with pytest.raises(CheckpointError, match=rf"{blocked}/run.*no earlier checkpoint"):
        save_checkpoint(accelerator, blocked / "run", 1, 2)


def test_damaged_newest_checkpoint_is_passed_over(tmp_path):
    from accelerate import Accelerator

    from engine.checkpoints import save_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, 3)
    (tmp_path / "checkpoint-3" / "model.safetensors").unlink()
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.warns(UserWarning) as record:
        assert resolve_resume("latest", tmp_path).name == "checkpoint-1"
    text = " ".join(str(w.message) for w in record)
    assert "model.safetensors is missing" in text and "bytes" in text
    with pytest.raises(CheckpointError, match="damaged checkpoint.*missing"):
        resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path)
