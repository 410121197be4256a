"""The diffusion training script end to end on the CPU: tiny tokenizer, tiny UNets."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffusion.latent_cache import LatentCache, measure_scaling_factor
from diffusion.train import DiffusionConfig, load_tokenizer
from engine.config import ConfigError, from_mapping, to_mapping
from pipelines import ClassConditionalLatentDiffusionPipeline, LatentDiffusionPipeline
from pipelines.sampling import training_config
from tests.launch import ROOT
from tests.tokenizer.test_train_tokenizer import tracked

TINY = {
    "unet": {
        "block_out_channels": [16, 16],
        "layers_per_block": 1,
        "attention_resolutions": [4],
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "num_classes": 0,
    },
    "data": {"source": "digits", "resolution": 16, "validation_size": 97},
    "cache": {"shard_size": 512},
    "train": {
        "max_steps": 6,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "ema_decay": 0.99,
        "log_every": 2,
        "sample_every": 3,
        "sample_steps": 2,
        "validation_steps": 3,
        "validation_size": 40,
        "checkpointing_steps": 2,
        "checkpoints_total_limit": 3,
    },
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    model = tiny_tokenizer(quantizer="looc", quantizer_options={"num_codes": 16, "code_dim": 2})
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    model.save_pretrained(path)
    return path


def write_config(path: Path, num_classes: int = 0, **train) -> Path:
    config = json.loads(json.dumps(TINY))
    config["unet"]["num_classes"] = num_classes
    config["train"].update(train)
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, tokenizer: Path, out: Path, *extra: str, ok: bool = True):
    done = subprocess.run(
        [
            sys.executable,
            "scripts/train_diffusion.py",
            "--config",
            str(config),
            "--tokenizer",
            str(tokenizer),
            "--output-dir",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("num_classes", [0, 10], ids=["unconditional", "class-conditional"])
def test_train_export_and_exact_resume(tmp_path, tokenizer_dir, num_classes):
    config = write_config(tmp_path / "c.yaml", num_classes)
    run(config, tokenizer_dir, tmp_path / "run")
    run_dir = tmp_path / "run"
    assert (run_dir / "images" / "samples_00000003.png").is_file()

    # the exported pipeline: right class, EMA UNet, and the latent scale measured on the cache
    cls = ClassConditionalLatentDiffusionPipeline if num_classes else LatentDiffusionPipeline
    pipe = cls.from_pretrained(run_dir / "pipeline")
    scale = measure_scaling_factor(LatentCache(run_dir / "latents"))
    assert pipe.vqvae.config.scaling_factor == pytest.approx(scale)
    assert scale != 1.0
    assert (pipe.unet.config.num_class_embeds or 0) == (num_classes + 1 if num_classes else 0)
    # it carries its training configs (eval_fid.py's defaults) and a model card listing them
    # the config as run: the file's values with every default filled in
    # (precision and accumulation as resolved: the launcher's, here accelerate's defaults)
    expected = to_mapping(from_mapping(DiffusionConfig, yaml.safe_load(config.read_text())))
    expected["train"].update(mixed_precision="no", gradient_accumulation_steps=1)
    assert training_config(run_dir / "pipeline") == expected
    card = (run_dir / "pipeline" / "README.md").read_text()
    assert cls.__name__ in card and "### diffusion" in card and "Not evaluated yet" in card

    # the tracker: the training and validation losses (EMA UNet on held-out latents), samples;
    # the export of the best validation loss beside the last
    logged = tracked(run_dir)
    assert set(logged["scalars"]["loss"]) == {2, 4, 6} and "samples" in logged["images"]
    val = logged["scalars"]["validation/loss"]
    assert set(val) == {3, 6} and all(0 < v < 10 for v in val.values())
    assert len(LatentCache(run_dir / "latents-validation")) == 97  # the held-out images
    best = load_file(run_dir / "pipeline-best" / "unet" / "diffusion_pytorch_model.safetensors")
    last = load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(best[k], last[k]) for k in last) == (val[6] < val[3])
    best_card = (run_dir / "pipeline-best" / "README.md").read_text()
    assert 'from_pretrained("pipeline-best"' in best_card and ".partial" not in best_card

    if not num_classes:  # fine-tuning: a run starting from this pipeline's UNet
        tuned = tmp_path / "tuned"
        run(
            config,
            tokenizer_dir,
            tuned,
            f"train.init_from={run_dir / 'pipeline'}",
            "train.max_steps=1",
            "train.learning_rate=1e-9",
            "train.validation_steps=1",
            "train.gradient_checkpointing=true",
        )
        after = load_file(tuned / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
        for key in last:
            torch.testing.assert_close(after[key], last[key], atol=1e-6, rtol=0, msg=key)

    # resume from step 2 (the cache is rebuilt from scratch and must come out the same)
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoint-2", resumed / "checkpoint-2")
    done = run(config, tokenizer_dir, resumed, "--resume_from_checkpoint", "latest")
    assert "at step 2" in done.stdout + done.stderr
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vqvae/diffusion_pytorch_model.safetensors",
    ):
        a, b = load_file(run_dir / "pipeline" / part), load_file(resumed / "pipeline" / part)
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)
    a = load_file(run_dir / "checkpoint-6" / "model.safetensors")
    b = load_file(resumed / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "raw (non-EMA) weights match too"


def test_stale_cache_is_refused(tmp_path, tokenizer_dir):
    cache = tmp_path / "shared-cache"
    config = write_config(tmp_path / "c.yaml", max_steps=1)
    run(config, tokenizer_dir, tmp_path / "a", f"cache.dir={cache}")
    done = run(
        config,
        tokenizer_dir,
        tmp_path / "b",
        f"cache.dir={cache}",
        "cache.quantized=false",
        ok=False,
    )
    assert done.returncode != 0
    assert "quantized" in done.stderr and str(cache) in done.stderr


def test_not_a_tokenizer_folder_is_refused(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    done = run(config, tmp_path, tmp_path / "run", ok=False)
    assert done.returncode != 0 and "not a saved tokenizer folder" in done.stderr


def test_labels_beyond_num_classes_are_refused(tmp_path, tokenizer_dir):
    config = write_config(tmp_path / "c.yaml", num_classes=5)
    done = run(config, tokenizer_dir, tmp_path / "run", ok=False)
    assert done.returncode != 0 and "unet.num_classes" in done.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"unet": {"num_classes": -1}}, "unet.num_classes"),
        ({"unet": {"block_out_channels": [20, 40]}}, "norm_num_groups"),
        ({"unet": {"layer_per_block": 2}}, "unet.layer_per_block"),
        ({"cache": {"quantised": True}}, "cache.quantised"),
        ({"train": {"label_dropout": 1.5}}, "train.label_dropout"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay"),
        ({"sampling": {}}, "unknown section"),
        ({"eval": {"reference_part": "test"}}, "eval.reference_part"),
        ({"eval": {"num_sample": 10}}, "eval.num_sample"),
        ({"train": {"max_step": 10}}, "train.max_step.*allowed keys"),
        ({"train": {"lr_warmup_steps": -1}}, "train.lr_warmup_steps.*must be >= 0"),
        ({"train": {"lr_scheduler": "cosinus"}}, "train.lr_scheduler.*choose one of"),
        ({"train": {"warmup_steps": 5}}, "warmup_steps; renamed train.lr_warmup_steps"),
        ({"cache": {"batch_size": 0}}, "cache.batch_size.*must be >= 1"),
        ({"data": {"source": "./missing_images"}}, "data.source.*no such file or folder"),
    ],
)
def test_bad_diffusion_configs_name_the_key(change, message, assert_config_refused):
    assert_config_refused(DiffusionConfig, TINY, change, message)


def test_a_folder_that_is_not_a_tokenizer_is_refused_before_building(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ConfigError, match="not a saved tokenizer folder.*tokenizer/ sub-folder"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "diffusion").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_diffusion_config_is_valid(path):
    recipe = from_mapping(DiffusionConfig, yaml.safe_load(path.read_text()))
    assert recipe.train.max_steps > recipe.train.log_every


# two processes: tests/end_to_end/test_fault_tolerance.py (reference run, SIGKILL, resume)


def test_unreadable_images_are_left_out_and_counted(tmp_path, tokenizer_dir):
    from tests.diffusion.test_latent_cache import bad_folder

    config = write_config(tmp_path / "c.yaml", max_steps=1, validation_steps=1)
    folder = bad_folder(tmp_path / "images")
    done = run(
        config, tokenizer_dir, tmp_path / "run", f"data.source={folder}", "data.validation_size=2"
    )
    assert "4 unreadable file(s) were left out of the latent caches" in done.stdout + done.stderr
    caches = [LatentCache(tmp_path / "run" / name) for name in ("latents", "latents-validation")]
    assert sum(len(c) for c in caches) == 18  # the readable images, each once


def test_sampling_runs_on_the_training_noise_schedule():
    """The exported pipelines' DDIM (pipelines.default_scheduler) samples on the schedule that
    training's DDPM (diffusion.unet.training_scheduler) adds noise with."""
    from diffusion.unet import training_scheduler
    from pipelines import default_scheduler

    train, sample = training_scheduler(), default_scheduler()
    assert train.config.num_train_timesteps == sample.config.num_train_timesteps == 1000
    assert torch.equal(train.betas, sample.betas)
    assert torch.equal(train.alphas_cumprod, sample.alphas_cumprod)
    assert train.config.prediction_type == sample.config.prediction_type == "epsilon"
    assert train.config.clip_sample is sample.config.clip_sample is False
    sample.set_timesteps(50)  # DDIM's timesteps are timesteps of the training schedule
    assert set(sample.timesteps.tolist()) <= set(train.timesteps.tolist())
    assert len(sample.timesteps) == 50
