"""Sample images from a saved pipeline: PNG files plus a grid.

    [accelerate launch] scripts/sample.py --pipeline runs/digits_uncond/pipeline --num-images 64 \
        --out samples/ [--batch-size 16] [--steps N] [--eta 0] [--seed 0] \
        [--guidance-scale 3] [--class-labels 1,2,3 | --classes-uniform]

Image i is drawn from its own seed (seed + i), so the images do not depend on the batch size
or on how many processes share the work. ``--steps`` defaults to the ``train.sample_steps`` of
the run that exported the pipeline (200 for FFHQ/LSUN, 250 for ImageNet), else 50.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

import pipelines


def load_pipeline(path: Path):
    index = path / "model_index.json"
    if not index.is_file():
        sys.exit(f"--pipeline {path}: not a saved pipeline folder (no model_index.json); pass "
                 "the DIR/pipeline folder written by train_diffusion.py")
    name = json.loads(index.read_text())["_class_name"]
    name = name[-1] if isinstance(name, list) else name
    cls = getattr(pipelines, name, None)
    if cls is None:
        sys.exit(f"--pipeline {path}: unknown pipeline class {name!r}")
    return cls.from_pretrained(path)


def default_steps(path: Path) -> int:
    config = path.parent / "config.yaml"
    if config.is_file():
        return int((yaml.safe_load(config.read_text()).get("train") or {}).get("sample_steps", 50))
    return 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, type=Path)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--class-labels", help="comma-separated labels, cycled over the images")
    labels.add_argument("--classes-uniform", action="store_true",
                        help="draw each image's label uniformly (the default)")
    args = parser.parse_args()

    accelerator = Accelerator()
    pipe = load_pipeline(args.pipeline).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    conditional = isinstance(pipe, pipelines.ClassConditionalLatentDiffusionPipeline)
    if not conditional and args.class_labels:
        sys.exit("--class-labels: this pipeline is unconditional")
    steps = args.steps or default_steps(args.pipeline)
    mine = list(range(args.num_images))[accelerator.process_index::accelerator.num_processes]
    args.out.mkdir(parents=True, exist_ok=True)
    names = {}
    for start in tqdm(range(0, len(mine), args.batch_size), disable=not
                      accelerator.is_local_main_process, desc=f"sampling ({steps} steps)"):
        ids = mine[start:start + args.batch_size]
        generators = [torch.Generator(accelerator.device).manual_seed(args.seed + i) for i in ids]
        if conditional:
            if args.class_labels:
                given = [int(c) for c in args.class_labels.split(",")]
                batch_labels = [given[i % len(given)] for i in ids]
            else:
                batch_labels = [int(torch.randint(pipe.num_classes, (1,), generator=
                                                  torch.Generator().manual_seed(args.seed + i)))
                                for i in ids]
            images = pipe(batch_labels, guidance_scale=args.guidance_scale,
                          num_inference_steps=steps, eta=args.eta, generator=generators,
                          output_type="pil").images
        else:
            batch_labels = [None] * len(ids)
            images = pipe(batch_size=len(ids), num_inference_steps=steps, eta=args.eta,
                          generator=generators, output_type="pil").images
        for i, label, image in zip(ids, batch_labels, images):
            names[i] = f"{i:06d}" + (f"_class{label}" if label is not None else "") + ".png"
            image.save(args.out / names[i])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(args.out.glob("[0-9]*.png"))[:64]
        tensors = [pil_to_tensor(Image.open(f).convert("RGB")).float() / 255 for f in files]
        save_image(make_grid(tensors, nrow=int(len(tensors) ** 0.5) or 1), args.out / "grid.png")
        print(f"{args.num_images} images and grid.png written to {args.out}")


if __name__ == "__main__":
    main()
