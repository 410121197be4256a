"""Score a saved pipeline: FID (and KID, IS, precision/recall, class-averaged FID) against its data.

    [accelerate launch] scripts/eval_fid.py --pipeline runs/digits_uncond/pipeline \
        [--reference SOURCE] [--reference-part train] [--reference-images N|all] \
        [--num-samples 50000] [--batch-size 32] [--steps N] [--eta 0] [--guidance-scale S] \
        [--classes-uniform | --class-labels 1,2,3] [--seed 0] [--dtype float32] \
        [--inception-weights PATH] [--kid] [--isc] [--prc] [--per-class] \
        [--save-samples DIR] [--out report.json] [--cache-dir DIR] [--refresh-reference] \
        [--no-model-card]

Defaults come from the ``eval`` and ``data`` sections of the config the pipeline was trained
with (saved in the folder): the papers' protocol for that dataset. Samples stream into the
Inception network without being written; with several processes each draws its share and the
features are gathered once. Reference features are cached (``--cache-dir``, default
~/.cache/nevercollapse/fid) under a key made of the data, part and preprocessing. The report is
printed, written to ``--out`` and added to the pipeline folder's model card (README.md).
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone

import diffusers
import torch
import torch_fidelity
from accelerate import Accelerator

from diffusion.evaluate import (
    EvalConfig,
    file_digest,
    folder_digest,
    generated_features,
    reference_features,
)
from engine.config import ConfigError, from_mapping
from engine.data import DataConfig
from engine.fid import class_averaged_fid, fidelity_metrics, load_inception
from pipelines.model_card import record_evaluation
from pipelines.sampling import is_conditional, load_pipeline, training_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NO_WEIGHTS = 3  # exit status when the Inception weights cannot be had (scripts/demo.sh uses it)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="folder written by train_diffusion.py")
    parser.add_argument("--reference", help="reference data source (default: the training data)")
    parser.add_argument("--reference-part", choices=["train", "validation"])
    parser.add_argument("--reference-images", help="at most this many reference images, or 'all'")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, help="DDIM steps")
    parser.add_argument("--eta", type=float, help="DDIM eta")
    parser.add_argument("--guidance-scale", type=float, help="class-conditional pipelines")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--class-labels", help="comma-separated labels, cycled over the samples")
    labels.add_argument(
        "--classes-uniform",
        action="store_true",
        help="draw each sample's label uniformly (the default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="sample in this precision (the quantizer stays in float32)",
    )
    parser.add_argument("--inception-weights", help="torch-fidelity's Inception weights file")
    parser.add_argument("--kid", action="store_true", help="also Kernel Inception Distance")
    parser.add_argument("--isc", action="store_true", help="also Inception Score")
    parser.add_argument("--prc", action="store_true", help="also precision and recall")
    parser.add_argument(
        "--per-class",
        action="store_true",
        help="also the class-averaged FID (class-conditional pipelines)",
    )
    parser.add_argument("--save-samples", help="also write the samples as PNGs here")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--cache-dir", help="reference feature cache")
    parser.add_argument(
        "--refresh-reference",
        action="store_true",
        help="recompute the reference features even if cached",
    )
    parser.add_argument(
        "--no-model-card",
        action="store_true",
        help="do not add the report to the pipeline folder's README.md",
    )
    return parser.parse_args()


def protocol(args, trained: dict, pipe) -> tuple[EvalConfig, int, float | None]:
    """The eval settings: the training config's ``eval`` section, overridden by the options."""
    config = from_mapping(EvalConfig, trained.get("eval"), "eval")
    given = {
        "num_samples": args.num_samples,
        "steps": args.steps,
        "eta": args.eta,
        "guidance_scale": args.guidance_scale,
        "reference_part": args.reference_part,
    }
    if args.reference_images is not None:
        given["reference_images"] = (
            None if args.reference_images == "all" else int(args.reference_images)
        )
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    train = trained.get("train") or {}
    steps = config.steps or int(train.get("sample_steps", 50))
    guidance = None
    if is_conditional(pipe):
        guidance = (
            config.guidance_scale
            if config.guidance_scale is not None
            else float(train.get("sample_guidance", 1.5))
        )
    return config, steps, guidance


def reference_data(args, trained: dict, pipe) -> DataConfig:
    data = dict(trained.get("data") or {})
    data.setdefault("resolution", pipe.vqvae.config.resolution)
    data.setdefault("channels", pipe.vqvae.config.in_channels)
    if args.reference:
        data["source"] = args.reference
    return from_mapping(DataConfig, data, "data")


def print_table(report: dict) -> None:
    m, s = report["metrics"], report["sampling"]
    rows = [("FID", f"{m['fid']:.3f}")]
    for key, name in (
        ("kernel_inception_distance_mean", "KID"),
        ("inception_score_mean", "IS"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("class_averaged_fid", "class-avg FID"),
    ):
        if key in m:
            rows.append((name, f"{m[key]:.4f}"))
    rows += [
        ("samples", str(s["num_samples"])),
        ("steps / eta", f"{s['steps']} / {s['eta']}"),
        (
            "reference",
            f"{report['reference']['key']} ({report['reference']['images']} "
            f"images, {'cached' if report['reference']['cached'] else 'computed'})",
        ),
        ("s / 1000 samples", f"{report['seconds_per_1000_samples']:.1f}"),
    ]
    if s["guidance_scale"] is not None:
        rows.insert(-2, ("guidance", str(s["guidance_scale"])))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:>{width}}  {value}" for name, value in rows))


def main() -> None:
    args = parse_args()
    accelerator = Accelerator()
    try:
        pipe = load_pipeline(args.pipeline, DTYPES[args.dtype]).to(accelerator.device)
        trained = training_config(args.pipeline)
        config, steps, guidance = protocol(args, trained, pipe)
        data = reference_data(args, trained, pipe)
    except (ValueError, ConfigError) as e:
        sys.exit(f"error: {e}")
    conditional = is_conditional(pipe)
    if not conditional and (args.class_labels or args.per_class):
        sys.exit("--class-labels / --per-class: this pipeline is unconditional")
    class_labels = [int(c) for c in args.class_labels.split(",")] if args.class_labels else None
    try:  # before any sampling: a missing weights file costs seconds, not hours
        inception = load_inception(args.inception_weights, accelerator.device, logits=args.isc)
    except FileNotFoundError as e:
        print(f"FID not computed: {e}", file=sys.stderr)
        sys.exit(NO_WEIGHTS)
    pipe.set_progress_bar_config(disable=True)

    start = time.perf_counter()
    weights = f"{inception.weights_path.name}#{file_digest(inception.weights_path)}"
    reference = reference_features(
        data,
        config.reference_part,
        inception,
        accelerator,
        weights=weights,
        max_images=config.reference_images,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        refresh=args.refresh_reference,
    )
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    generated = generated_features(
        pipe,
        inception,
        accelerator,
        num_samples=config.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        steps=steps,
        eta=config.eta,
        guidance_scale=guidance,
        class_labels=class_labels,
        save_dir=args.save_samples,
    )
    sampling_seconds = time.perf_counter() - start
    if not accelerator.is_main_process:
        return

    metrics = fidelity_metrics(
        generated,
        reference.features,
        kid=args.kid,
        isc=args.isc,
        prc=args.prc,
        seed=args.seed,
        device=accelerator.device,  # precision/recall's distances
    )
    if args.per_class:
        try:
            metrics.update(
                class_averaged_fid(
                    generated["2048"], generated["labels"], reference.features, reference.labels
                )
            )
        except ValueError as e:
            sys.exit(f"--per-class: {e}")
    report = {
        "metrics": metrics,
        "sampling": {
            "num_samples": config.num_samples,
            "steps": steps,
            "eta": config.eta,
            "guidance_scale": guidance,
            "seed": args.seed,
            "class_labels": class_labels or ("uniform" if conditional else None),
            "scheduler": type(pipe.scheduler).__name__,
            "dtype": args.dtype,
        },
        "reference": {
            "key": reference.key,
            "images": len(reference.features),
            "cached": reference.cached,
            "cache_file": str(reference.path),
            **reference.spec,
        },
        "pipeline": {
            "path": str(args.pipeline),
            "class": type(pipe).__name__,
            "hash": folder_digest(args.pipeline),
        },
        "eval_config": asdict(config),
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "seconds": {
            "reference": round(reference_seconds, 2),
            "sampling_and_features": round(sampling_seconds, 2),
        },
        "seconds_per_1000_samples": 1000 * sampling_seconds / config.num_samples,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "torch_fidelity": torch_fidelity.__version__,
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print_table(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if not args.no_model_card:
        record_evaluation(args.pipeline, report)


if __name__ == "__main__":
    main()
