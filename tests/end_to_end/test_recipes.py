"""Every shipped recipe, end to end at miniature size, with its own settings.

A fixture writes a small dataset in the recipe's own format (class folders, a flat folder, an
LSUN LMDB, a parquet file with the hub dataset's columns). Each test overrides only the data
path, the resolution, the model width, the steps and the batch; everything else is the recipe's:
precision, quantizer and its options, loss weights (GAN, LPIPS with test-made VGG16 weights),
loader workers, cache flags, guidance and the ``eval`` protocol (scored with a test-made
Inception). ``disc_start`` is moved inside the run so that the discriminator trains. A recipe
whose data format has no miniature here fails, so a new config cannot go untested.
"""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import parse_yaml
from tests.launch import ROOT
from tokenizer import VQTokenizer

TOKENIZER_RECIPES = sorted((ROOT / "configs" / "tokenizer").glob("*.yaml"))
DIFFUSION_RECIPES = sorted((ROOT / "configs" / "diffusion").glob("*.yaml"))
# the tokenizer recipe whose latents each diffusion recipe is trained on (its header says so)
TOKENIZER_OF = {
    "digits_cond": "digits_demo",
    "digits_uncond": "digits_demo",
    "ffhq": "ffhq_f8_cvq",
    "imagenet_cin": "imagenet_f8_cvq",
    "lsun_bedrooms": "lsun_bedrooms_f8_cvq",
    "lsun_churches": "lsun_churches_f8_cvq",
}
# local image folders named by the recipes, and their layout
FOLDERS = {"data/imagenet/train": "classes", "data/ffhq": "flat"}
HUB = {"uoft-cs/cifar10", "ylecun/mnist"}  # stood in for by a parquet file of the same columns
WIDTH = 8  # model.ch of the miniature tokenizers


def _noise(side: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8))
    return image.convert(mode)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def miniature_source(data: dict, folder: Path, side: int) -> str:
    """A small dataset in the format of ``data.source``; returns the source to train on."""
    source = data["source"]
    held = data.get("validation_size", 0.05)
    # at least two held-out images: the validation batches of a miniature UNet (1×1 at its
    # bottom, where GroupNorm needs more than one value per group) must not be of one latent
    count = held + 12 if isinstance(held, int) else max(13, round(2 / held))
    if source == "digits":
        return source
    if source.startswith("lsun:"):
        import lmdb

        env = lmdb.open(str(folder / "lmdb"), map_size=1 << 26)
        with env.begin(write=True) as txn:
            for i in range(count):
                txn.put(f"{i:040x}".encode(), _encoded(_noise(side, i), "WEBP"))
        env.close()
        return f"lsun:{folder / 'lmdb'}"
    if source in HUB:
        import datasets

        image, label = data.get("image_column", "image"), data.get("label_column")
        mode = "L" if data.get("channels", 3) == 1 else "RGB"
        columns = {image: [_noise(side, i, mode) for i in range(count)]}
        features = {image: datasets.Image()}
        if label:
            columns[label] = [i % 10 for i in range(count)]
            features[label] = datasets.ClassLabel(num_classes=10)
        table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        table.to_parquet(str(folder / "data.parquet"))
        return str(folder / "data.parquet")
    layout = FOLDERS.get(source)
    assert layout, f"no miniature dataset for data.source {source!r}: add one to this file"
    for i in range(count):
        sub = folder / "images" / (f"n{i % 2:08d}" if layout == "classes" else "")
        sub.mkdir(parents=True, exist_ok=True)
        _noise(side, i).save(sub / f"{i:05d}.jpg" if layout == "classes" else sub / f"{i}.png")
    return str(folder / "images")


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_every_shipped_recipe_has_a_miniature():
    assert {p.stem for p in DIFFUSION_RECIPES} == set(TOKENIZER_OF)
    assert {f"{name}.yaml" for name in TOKENIZER_OF.values()} <= {p.name for p in TOKENIZER_RECIPES}
    for path in TOKENIZER_RECIPES:
        source = parse_yaml(path.read_text())["data"]["source"]
        assert source == "digits" or source.startswith("lsun:") or source in HUB | set(FOLDERS), (
            f"{path.name}: no miniature dataset for {source!r}"
        )
    for path in DIFFUSION_RECIPES:  # they read their tokenizer's images (its config.json)
        assert "source" not in parse_yaml(path.read_text())["data"], path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", TOKENIZER_RECIPES, ids=lambda p: p.stem)
def test_tokenizer_recipe_as_shipped(path, tmp_path, vgg_torch_home):
    recipe = parse_yaml(path.read_text())
    side = min(recipe["model"]["resolution"], 32)
    source = miniature_source(recipe["data"], tmp_path, side + 8)
    overrides = [
        f"data.source={source}",
        f"data.resolution={side}",
        f"model.resolution={side}",
        f"model.ch={WIDTH}",
        "train.max_steps=3",
        "train.batch_size=2",
    ]
    gan = recipe["loss"].get("disc_weight", 0.8) > 0
    if gan:
        overrides += ["loss.disc_start=1", "loss.disc_channels=8"]
    out = tmp_path / "run"
    run(
        "train_tokenizer.py",
        "--config",
        str(path),
        "--output-dir",
        str(out),
        *overrides,
        env={"TORCH_HOME": str(vgg_torch_home)},
    )
    tokenizer = VQTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.config.quantizer == recipe["model"]["quantizer"]
    assert dict(tokenizer.config.quantizer_options) == recipe["model"]["quantizer_options"]
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "model_1.safetensors").is_file() == gan  # the discriminator trained
    x = torch.rand(2, recipe["model"].get("in_channels", 3), side, side) * 2 - 1
    assert torch.isfinite(tokenizer(x).sample).all()


@pytest.mark.slow
def test_tokenizer_recipe_in_bf16_resumes(tmp_path, vgg_torch_home):
    """ImageNet f16 LooC (bf16, LPIPS, GAN from step 1): 2 steps, then resumed to 4."""
    path = ROOT / "configs" / "tokenizer" / "imagenet_f16_looc.yaml"
    source = miniature_source(parse_yaml(path.read_text())["data"], tmp_path, 40)
    common = [
        "--config",
        str(path),
        "--output-dir",
        str(tmp_path / "run"),
        f"data.source={source}",
        "data.resolution=32",
        "model.resolution=32",
        f"model.ch={WIDTH}",
        "train.batch_size=2",
        "loss.disc_start=1",
        "loss.disc_channels=8",
        "train.checkpointing_steps=2",
    ]
    env = {"TORCH_HOME": str(vgg_torch_home)}
    run("train_tokenizer.py", *common, "train.max_steps=2", env=env)
    done = run(
        "train_tokenizer.py",
        *common,
        "train.max_steps=4",
        "--resume_from_checkpoint",
        "latest",
        env=env,
    )
    assert "at step 2" in done.stdout + done.stderr
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    assert (tmp_path / "run" / "tokenizer" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("path", DIFFUSION_RECIPES, ids=lambda p: p.stem)
def test_diffusion_recipe_as_shipped(path, tmp_path, fake_inception_file):
    recipe = parse_yaml(path.read_text())
    tokenizer_recipe = parse_yaml(
        (ROOT / "configs" / "tokenizer" / f"{TOKENIZER_OF[path.stem]}.yaml").read_text()
    )
    stage_one = tokenizer_recipe["model"]
    data = {**tokenizer_recipe["data"], **recipe["data"]}  # the tokenizer's images
    held_out = []
    if isinstance(data.get("validation_size"), float) and data["validation_size"] < 0.05:
        data["validation_size"] = 2  # 2 of 14 images held out, not 2 of 200 (LSUN's 1%)
        held_out = ["data.validation_size=2"]
    unet = recipe["unet"]
    levels = len(unet["block_out_channels"])
    factor = 2 ** (len(stage_one["ch_mult"]) - 1)
    side = (
        data["resolution"] if data["source"] == "digits" else factor * 2 ** (levels - 1)
    )  # the fewest latents the UNet's levels allow
    torch.manual_seed(0)  # stage one's architecture and quantizer, untrained and narrow
    VQTokenizer(**{**stage_one, "resolution": side, "ch": WIDTH}).save_pretrained(
        tmp_path / "stage_one" / "tokenizer"
    )
    width = math.lcm(unet["norm_num_groups"], unet["attention_head_dim"])
    source = miniature_source(data, tmp_path, side + 8)
    out = tmp_path / "run"
    common = [
        "--config",
        str(path),
        "--tokenizer",
        str(tmp_path / "stage_one" / "tokenizer"),
        "--output-dir",
        str(out),
        f"data.source={source}",
        f"data.resolution={side}",
        f"unet.block_out_channels={[width] * levels}",
        "train.batch_size=2",
        "train.sample_steps=4",
        "train.checkpointing_steps=2",
        *held_out,
    ]
    run("train_diffusion.py", *common, "train.max_steps=2")
    done = run(
        "train_diffusion.py", *common, "train.max_steps=3", "--resume_from_checkpoint", "latest"
    )
    assert "at step 2" in done.stdout + done.stderr
    cache = json.loads((out / "latents" / "metadata.json").read_text())
    for key in ("flips", "quantized", "dtype"):
        assert cache[key] == recipe["cache"].get(key, {"dtype": "float32"}.get(key)), key
    assert cache["precision"] == recipe["train"].get("mixed_precision", "no")

    run(
        "sample.py",
        "--pipeline",
        str(out / "pipeline"),
        "--num-images",
        "2",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "samples"),
    )
    assert (tmp_path / "samples" / "grid.png").is_file()
    report = tmp_path / "fid.json"
    run(
        "eval_fid.py",
        "--pipeline",
        str(out / "pipeline"),
        "--num-samples",
        "4",
        "--reference-images",
        "4",
        "--batch-size",
        "4",
        "--steps",
        "4",  # the eval section's 200-250 steps: test_each_recipes_eval_section_is_its_fid_protocol
        "--inception-weights",
        str(fake_inception_file),
        "--cache-dir",
        str(tmp_path / "fid"),
        "--out",
        str(report),
    )
    sampling, protocol = json.loads(report.read_text())["sampling"], recipe["eval"]
    assert math.isfinite(json.loads(report.read_text())["metrics"]["fid"])
    assert sampling["steps"] == 4
    assert sampling["eta"] == protocol.get("eta", 0.0)  # the eval section's protocol
    if unet["num_classes"]:
        assert sampling["guidance_scale"] == protocol["guidance_scale"]


# ------------------------------------------------------------------ the recipes' real sizes, GPU
# python -m pytest -m cuda: both trainers in bf16 at the recipes' real model sizes (a few steps,
# checkpoint and resume), the pipeline in bf16 and fp16 with its codebook in float32, and the
# FID stream; minutes on one GPU.


@pytest.fixture(scope="module")
def real_size_run(tmp_path_factory, vgg_torch_home):
    """ImageNet f8 CVQ tokenizer (bf16, 256 px, full width) trained 2 steps and resumed to 3,
    then the class-conditional ImageNet LDM (bf16, full UNet) on its latents, likewise."""
    tmp = tmp_path_factory.mktemp("cuda")
    tokenizer_recipe = ROOT / "configs" / "tokenizer" / "imagenet_f8_cvq.yaml"
    source = miniature_source(parse_yaml(tokenizer_recipe.read_text())["data"], tmp, 264)
    env = {"TORCH_HOME": str(vgg_torch_home)}
    stage_one = [
        "--config",
        str(tokenizer_recipe),
        "--output-dir",
        str(tmp / "stage_one"),
        f"data.source={source}",
        "train.batch_size=2",
        "loss.disc_start=1",
        "train.checkpointing_steps=2",
    ]
    run("train_tokenizer.py", *stage_one, "train.max_steps=2", env=env)
    done = run(
        "train_tokenizer.py",
        *stage_one,
        "train.max_steps=3",
        "--resume_from_checkpoint",
        "latest",
        env=env,
    )
    assert "at step 2" in done.stdout + done.stderr
    stage_two = [
        "--config",
        str(ROOT / "configs" / "diffusion" / "imagenet_cin.yaml"),
        "--tokenizer",
        str(tmp / "stage_one" / "tokenizer"),
        "--output-dir",
        str(tmp / "stage_two"),
        f"data.source={source}",
        "train.batch_size=4",
        "train.sample_steps=4",
        "train.checkpointing_steps=2",
    ]
    run("train_diffusion.py", *stage_two, "train.max_steps=2")
    done = run(
        "train_diffusion.py", *stage_two, "train.max_steps=3", "--resume_from_checkpoint", "latest"
    )
    assert "at step 2" in done.stdout + done.stderr
    return tmp


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_pipeline_in_half_precision_keeps_the_codebook_in_float32(real_size_run, dtype):
    from pipelines.sampling import load_pipeline

    pipe = load_pipeline(real_size_run / "stage_two" / "pipeline", dtype).to("cuda")
    assert pipe.vqvae.vector_quantizer.codebook.dtype == torch.float32
    assert pipe.unet.dtype == dtype
    images = pipe([1, 2], num_inference_steps=4, guidance_scale=1.5, output_type="pt").images
    assert images.shape == (2, 3, 256, 256) and torch.isfinite(images).all()


@pytest.mark.cuda
def test_cuda_fid_stream(real_size_run, fake_inception_file):
    report = real_size_run / "fid.json"
    run(
        "eval_fid.py",
        "--pipeline",
        str(real_size_run / "stage_two" / "pipeline"),
        "--num-samples",
        "8",
        "--reference-images",
        "8",
        "--steps",
        "10",
        "--dtype",
        "bfloat16",
        "--inception-weights",
        str(fake_inception_file),
        "--cache-dir",
        str(real_size_run / "fid"),
        "--out",
        str(report),
    )
    result = json.loads(report.read_text())
    assert math.isfinite(result["metrics"]["fid"]) and result["device"].startswith("cuda")
