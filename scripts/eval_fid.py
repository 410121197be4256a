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
from dataclasses import fields

from engine.cli import same_as_library

# copied from the library for --help, which answers before torch is imported, and compared with
# it right after the import (check_copies): the names of pipelines.sampling.DTYPES, FIDOptions's
# defaults that are values, and diffusion.evaluate.CACHE_ENV
DTYPES = ("float32", "bfloat16", "float16")
DEFAULTS = {"batch_size": 32, "seed": 0, "dtype": "float32"}
CACHE_ENV = "NEVERCOLLAPSE_FID_CACHE"


def check_copies() -> None:
    from diffusion import evaluate, fid_report
    from pipelines import sampling

    same_as_library("pipelines.sampling.DTYPES", DTYPES, tuple(sampling.DTYPES))
    library = {f.name: f.default for f in fields(fid_report.FIDOptions) if f.name in DEFAULTS}
    same_as_library("diffusion.fid_report.FIDOptions", DEFAULTS, library)
    same_as_library("diffusion.evaluate.CACHE_ENV", CACHE_ENV, evaluate.CACHE_ENV)


def build_parser() -> argparse.ArgumentParser:
    # an option not given is absent: its default is FIDOptions's (or the training config's)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS
    )
    config = "the pipeline's training config"
    parser.add_argument("--pipeline", required=True, help="folder written by train_diffusion.py")
    parser.add_argument(
        "--reference", help=f"reference data source (default: data.source of {config})"
    )
    parser.add_argument(
        "--reference-part",
        choices=["train", "validation"],
        help=f"the part of the reference data (default: eval.reference_part of {config})",
    )
    parser.add_argument(
        "--reference-images",
        help="at most this many reference images (a fixed random subset), or 'all' "
        f"(default: eval.reference_images of {config})",
    )
    parser.add_argument(
        "--num-samples", type=int, help=f"images generated (default: eval.num_samples of {config})"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"images per pipeline call (default: {DEFAULTS['batch_size']})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"DDIM steps (default: eval.steps of {config}, else its train.sample_steps)",
    )
    parser.add_argument("--eta", type=float, help=f"DDIM eta (default: eval.eta of {config})")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance of class-conditional pipelines (default: "
        f"eval.guidance_scale of {config}, else its train.sample_guidance)",
    )
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument(
        "--class-labels",
        help="comma-separated labels, cycled over the samples (default: uniform labels)",
    )
    labels.add_argument(
        "--classes-uniform",
        action="store_true",
        help="draw each sample's label uniformly (the default)",
    )
    parser.add_argument(
        "--seed", type=int, help=f"sample i uses seed + i (default: {DEFAULTS['seed']})"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="sample in this precision; the quantizer stays in float32 "
        f"(default: {DEFAULTS['dtype']})",
    )
    parser.add_argument(
        "--inception-weights",
        help="torch-fidelity's Inception weights file (default: the torch hub cache's, "
        "downloaded there if possible)",
    )
    parser.add_argument("--kid", action="store_true", help="also Kernel Inception Distance")
    parser.add_argument("--isc", action="store_true", help="also Inception Score")
    parser.add_argument("--prc", action="store_true", help="also precision and recall")
    parser.add_argument(
        "--per-class",
        action="store_true",
        help="also the class-averaged FID (class-conditional pipelines)",
    )
    parser.add_argument(
        "--save-samples", help="also write the samples as PNGs here (default: none written)"
    )
    parser.add_argument(
        "--out",
        help="write the JSON report here (default: the report is printed and added to the "
        "model card only)",
    )
    parser.add_argument(
        "--cache-dir",
        help=f"reference feature cache (default: ${CACHE_ENV}, else "
        "$XDG_CACHE_HOME/nevercollapse/fid, else ~/.cache/nevercollapse/fid)",
    )
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
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


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
    options = vars(parse_args())  # --help exits here, before torch is imported
    from diffusion.fid_report import EvaluationError, FIDOptions, fid_report
    from pipelines.model_card import record_evaluation

    check_copies()
    out, card = options.pop("out", None), not options.pop("no_model_card", False)
    options.pop("classes_uniform", None)  # uniform labels are the default
    try:
        report = fid_report(FIDOptions(**options))
    except EvaluationError as e:
        print(e, file=sys.stderr)
        sys.exit(e.status)
    if report is None:  # not the main process, which reports
        return
    print_table(report)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    if card:
        record_evaluation(options["pipeline"], report)


if __name__ == "__main__":
    main()
