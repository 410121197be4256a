"""The ``data`` family: listing an image folder into a manifest, and encoding a latent cache."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import ROOT, row


def bench_data(args, device) -> list[dict]:
    """Listing an image folder (100,000 files in 1,000 class folders; tiny: 2,000 in 20) into a
    manifest, the first time and from the manifest, and encoding a latent cache at 256 px with
    flips (the real recipes' f8 tokenizer; tiny: 8 channels wide): one decode per image pair,
    loader workers, bf16 autocast."""
    import os

    from accelerate import Accelerator
    from PIL import Image

    from diffusion.latent_cache import CacheConfig, build_latent_cache
    from engine.data.manifest import open_manifest
    from tokenizer import VQTokenizer

    files, classes = (100_000, 1000) if args.size == "real" else (2_000, 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images" / "train"
        for c in range(classes):
            (root / f"n{c:08d}").mkdir(parents=True)
            for i in range(files // classes):
                (root / f"n{c:08d}" / f"{i:06d}.JPEG").touch()  # names only: no decode
        cache = Path(tmp) / "manifests"
        for what in ("first listing", "manifest reused"):
            start = time.perf_counter()
            manifest = open_manifest(str(root), "folder", cache_dir=cache)
            seconds = time.perf_counter() - start
            rows.append(
                row(
                    "data",
                    f"image folder, {what}",
                    f"{len(manifest.table):,} files, {classes:,} classes",
                    seconds,
                    None,
                    files,
                    "files/s",
                )
            )
        images = Path(tmp) / "photos"
        images.mkdir()
        count = 17 if args.size == "tiny" else 65  # one image is held out
        generator = torch.Generator().manual_seed(0)
        for i in range(count):
            array = (torch.rand(288, 288, 3, generator=generator) * 255).byte().numpy()
            Image.fromarray(array).save(images / f"{i:05d}.jpg", quality=90)
        model = yaml.safe_load(open(ROOT / "configs/tokenizer/ffhq_f8_cvq.yaml"))["model"]
        if args.size == "tiny":
            model["ch"] = 8
        torch.manual_seed(0)
        tokenizer = VQTokenizer(**model)
        os.environ.setdefault("NEVERCOLLAPSE_DATA_CACHE", str(cache))
        for precision, workers in (("no", 0), ("bf16", 2)):
            accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
            start = time.perf_counter()
            build_latent_cache(
                tokenizer,
                {"source": str(images), "resolution": 256, "validation_size": 1},
                CacheConfig(
                    dir=str(Path(tmp) / f"latents-{precision}"),
                    flips=True,
                    batch_size=16,
                    num_workers=workers,
                ),
                accelerator=accelerator,
            )
            seconds = time.perf_counter() - start
            accelerator.free_memory()
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            rows.append(
                row(
                    "data",
                    f"latent cache encoding, {precision}, {workers} workers",
                    f"{count - 1} images at 256 px, flips, ch {model['ch']}",
                    seconds,
                    None,
                    count - 1,
                    "images/s",
                    f"{2 * (count - 1) / seconds:,.1f} latents/s",
                )
            )
    return rows
