"""scripts/sample.py: files, grid, per-image seeds (same images on one or two processes)."""

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from pipelines import ClassConditionalLatentDiffusionPipeline
from tests.launch import ROOT, launch_two_processes


def sample(*args, ok=True):
    done = subprocess.run(
        [sys.executable, "scripts/sample.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def pixels(path):
    return np.asarray(Image.open(path))


def test_images_depend_only_on_their_seed(tmp_path, save_pipeline):
    pipe = save_pipeline(tmp_path / "pipe")
    sample(
        "--pipeline",
        pipe,
        "--num-images",
        5,
        "--batch-size",
        2,
        "--steps",
        3,
        "--out",
        tmp_path / "one",
    )
    files = sorted(p.name for p in (tmp_path / "one").glob("0*.png"))
    assert files == [f"{i:06d}.png" for i in range(5)]
    assert (tmp_path / "one" / "grid.png").is_file()
    launch_two_processes(
        ROOT / "scripts" / "sample.py",
        "--pipeline",
        str(pipe),
        "--num-images",
        "5",
        "--batch-size",
        "3",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "two"),
        port=29551,
    )
    for name in files:
        assert np.array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name))
    assert not np.array_equal(
        pixels(tmp_path / "one" / files[0]), pixels(tmp_path / "one" / files[1])
    )


def test_class_labels(tmp_path, save_pipeline):
    pipe = save_pipeline(tmp_path / "pipe", num_classes=3)
    sample(
        "--pipeline",
        pipe,
        "--num-images",
        4,
        "--steps",
        2,
        "--class-labels",
        "2,0",
        "--out",
        tmp_path / "out",
    )
    names = sorted(p.name for p in (tmp_path / "out").glob("0*.png"))
    assert names == [
        "000000_class2.png",
        "000001_class0.png",
        "000002_class2.png",
        "000003_class0.png",
    ]
    done = sample(
        "--pipeline",
        pipe,
        "--num-images",
        1,
        "--steps",
        2,
        "--class-labels",
        "7",
        "--out",
        tmp_path / "bad",
        ok=False,
    )
    assert done.returncode != 0 and "out of range" in done.stderr
    assert "Traceback" not in done.stderr  # refused before sampling, in one line


def test_class_labels_by_name(tmp_path, save_pipeline):
    plain = save_pipeline(tmp_path / "plain", num_classes=3)
    id2label = {0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark"}
    named = ClassConditionalLatentDiffusionPipeline.from_pretrained(plain, id2label=id2label)
    named.save_pretrained(tmp_path / "named")

    def labelled(pipe, labels, out, ok=True):
        args = ("--pipeline", pipe, "--num-images", 3, "--steps", 2, "--out", tmp_path / out)
        return sample(*args, "--class-labels", labels, ok=ok)

    labelled(tmp_path / "named", "goldfish, Tinca tinca,2", "names")  # names, synonyms, ids
    labelled(tmp_path / "named", "1,0,2", "ids")
    files = sorted(p.name for p in (tmp_path / "names").glob("0*.png"))
    assert files == ["000000_class1.png", "000001_class0.png", "000002_class2.png"]
    for name in files:
        assert np.array_equal(pixels(tmp_path / "names" / name), pixels(tmp_path / "ids" / name))
    done = labelled(tmp_path / "named", "goldfsh,tench", "bad", ok=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--class-labels: unknown class names ['goldfsh']" in done.stderr
    assert "'goldfish'" in done.stderr  # what was meant
    done = labelled(plain, "tench", "none", ok=False)
    assert done.returncode != 0 and "no class names" in done.stderr


def test_unconditional_pipeline_refuses_labels(tmp_path, save_pipeline):
    pipe = save_pipeline(tmp_path / "pipe")
    done = sample(
        "--pipeline",
        pipe,
        "--num-images",
        1,
        "--class-labels",
        "1",
        "--out",
        tmp_path / "out",
        ok=False,
    )
    assert done.returncode != 0 and "unconditional" in done.stderr


def test_not_a_pipeline_folder(tmp_path):
    done = sample("--pipeline", tmp_path, "--num-images", 1, "--out", tmp_path / "o", ok=False)
    assert done.returncode != 0 and "not a saved pipeline folder" in done.stderr


def test_half_precision_loading_keeps_the_codebook_in_float32(tmp_path, save_pipeline):
    from pipelines.sampling import load_pipeline, sample_images

    path = save_pipeline(tmp_path / "pipe")
    full = sample_images(load_pipeline(path), [0, 1], seed=0, steps=3)
    for dtype in (torch.bfloat16, torch.float16):
        pipe = load_pipeline(path, dtype)
        assert pipe.vqvae.vector_quantizer.codebook.dtype == torch.float32
        assert pipe.unet.dtype == dtype and pipe.vqvae.quant_conv.weight.dtype == dtype
        images = sample_images(pipe, [0, 1], seed=0, steps=3)
        assert images.dtype == dtype  # the latents follow the UNet's dtype
        assert (images.float() - full).abs().max() < 0.1  # same images, rounding apart
