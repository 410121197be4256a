"""Sample images from a saved pipeline: PNG files plus a grid.

    [accelerate launch] scripts/sample.py --pipeline runs/digits_uncond/pipeline --num-images 64 \
        --out samples/ [--batch-size 16] [--steps N] [--eta 0] [--seed 0] \
        [--guidance-scale 3] [--class-labels 1,2,3 | --classes-uniform]

Image i is drawn from its own seed (seed + i), so the images do not depend on the batch size
or on how many processes share the work. ``--steps`` defaults to the ``train.sample_steps`` of
the run that exported the pipeline (200 for FFHQ/LSUN, 250 for ImageNet), else 50.
``--class-labels`` takes class ids or the class names the pipeline knows (its ``id2label``,
from the training data's class folders or ``ClassLabel`` names; see ``pipe.labels``).
"""

import argparse
import sys
from pathlib import Path

FALLBACK_STEPS = 50  # DDIM steps when the pipeline's training config names none


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pipeline", required=True, type=Path, help="DIR/pipeline of train_diffusion.py"
    )
    parser.add_argument(
        "--num-images", type=int, default=64, help="images to draw (default: %(default)s)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for the PNG files and grid.png"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per pipeline call; the images do not depend on it (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="DDIM steps (default: the train.sample_steps of the run that exported the "
        f"pipeline, else {FALLBACK_STEPS})",
    )
    parser.add_argument(
        "--eta", type=float, default=0.0, help="DDIM eta, 0: deterministic (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="image i is drawn from seed + i (default: %(default)s)"
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=3.0,
        help="classifier-free guidance of class-conditional pipelines (default: %(default)s)",
    )
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument(
        "--class-labels",
        help="comma-separated class ids or names (e.g. 3,1 or tench,goldfish), cycled over the "
        "images (default: uniform labels, as --classes-uniform)",
    )
    labels.add_argument(
        "--classes-uniform",
        action="store_true",
        help="draw each image's label uniformly (the default)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()  # --help exits here, before torch is imported
    from accelerate import Accelerator
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import make_grid, save_image
    from tqdm.auto import tqdm

    from pipelines.sampling import (
        class_label_ids,
        image_labels,
        is_conditional,
        load_pipeline,
        sample_images,
        training_config,
    )

    accelerator = Accelerator()
    try:
        pipe = load_pipeline(args.pipeline).to(accelerator.device)
    except ValueError as e:
        sys.exit(str(e))
    pipe.set_progress_bar_config(disable=True)
    conditional = is_conditional(pipe)
    if not conditional and args.class_labels:
        sys.exit("--class-labels: this pipeline is unconditional")
    try:
        given = class_label_ids(pipe, args.class_labels) if args.class_labels else None
    except ValueError as e:
        sys.exit(f"--class-labels: {e}")
    steps = args.steps or int(
        (training_config(args.pipeline).get("train") or {}).get("sample_steps", FALLBACK_STEPS)
    )
    mine = list(range(args.num_images))[accelerator.process_index :: accelerator.num_processes]
    args.out.mkdir(parents=True, exist_ok=True)
    for start in tqdm(
        range(0, len(mine), args.batch_size),
        disable=not accelerator.is_local_main_process,
        desc=f"sampling ({steps} steps)",
    ):
        ids = mine[start : start + args.batch_size]
        labels = image_labels(ids, args.seed, pipe.num_classes, given) if conditional else None
        images = sample_images(
            pipe,
            ids,
            seed=args.seed,
            steps=steps,
            eta=args.eta,
            guidance_scale=args.guidance_scale,
            labels=labels,
            output_type="pil",
        )
        for k, (i, image) in enumerate(zip(ids, images)):
            suffix = f"_class{labels[k]}" if conditional else ""
            image.save(args.out / f"{i:06d}{suffix}.png")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(args.out.glob("[0-9]*.png"))[:64]
        tensors = [pil_to_tensor(Image.open(f).convert("RGB")).float() / 255 for f in files]
        save_image(make_grid(tensors, nrow=int(len(tensors) ** 0.5) or 1), args.out / "grid.png")
        print(f"{args.num_images} images and grid.png written to {args.out}")


if __name__ == "__main__":
    main()
