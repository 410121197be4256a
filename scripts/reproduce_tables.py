"""Reproduce the papers' small-image tokenizer tables (CVQ-VAE Tab. 1 / LooC Tab. 1, LooC Tab. 3,
CVQ-VAE Tab. 4c) and compare the field's quantizers (``--table field``) on the MNIST test set, and
write table.md, results.json and usage.png.

    python scripts/reproduce_tables.py [--table main|looc_dstar|cvq_anchors|field|all]
        [--steps 4400] [--batch-size 1024] [--seeds 0 1 2] [--val-every N] [--device cuda]
        [--out runs/reproduce] [--quick]

Runs already in OUT/results.json (made with the same settings) are kept and not run again, and
the file is rewritten after every run: an interrupted table is completed by running the same
command again, or given more seeds by adding them.
"""

import argparse
import os
import time
from dataclasses import fields

from engine.cli import same_as_library

MNIST_ENV, MNIST_FALLBACK = "NEVERCOLLAPSE_MNIST", "/work/shared/data/mnist"
DEFAULT_MNIST = os.environ.get(MNIST_ENV, MNIST_FALLBACK)
# --quick: a smoke test of the whole pipeline on the CPU (well under a minute), not a result.
QUICK = dict(steps=20, batch_size=32, val_every=10, val_images=200)
QUICK_ROWS = {
    "main": ["VQ 1024x128", "CVQ 512x64 (closest)", "LooC 32x4 (unshuffle, interpolated)"],
    "looc_dstar": ["LooC 256x16", "LooC 256x64"],
    "cvq_anchors": ["CVQ closest (online)", "CVQ random (offline)"],
    "field": ["FSQ [8, 5, 5, 5]", "LFQ 2^10", "SimVQ 1024x128", "IBQ 1024x128"],
}
# copied from tokenizer.experiments.reproduce for --help, which answers before torch is
# imported, and compared with it right after the import (check_copies)
TABLE_CHOICES = ("main", "looc_dstar", "cvq_anchors", "field", "all")
RUN_DEFAULTS = {"steps": 4400, "batch_size": 1024}  # RunConfig's


def check_copies() -> None:
    from tokenizer.experiments import reproduce

    same_as_library("reproduce.TABLE_CHOICES", TABLE_CHOICES, reproduce.TABLE_CHOICES)
    library = {f.name: f.default for f in fields(reproduce.RunConfig) if f.name in RUN_DEFAULTS}
    same_as_library("reproduce.RunConfig", RUN_DEFAULTS, library)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--table",
        default="main",
        help=f"which table to reproduce: one of {', '.join(TABLE_CHOICES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per row (default: {RUN_DEFAULTS['steps']}, the official 500 "
        f"epochs of 9,000 images at 1,024; --quick: {QUICK['steps']})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"batch size (default: {RUN_DEFAULTS['batch_size']}; --quick: {QUICK['batch_size']})",
    )
    parser.add_argument(
        "--lr", type=float, default=3e-4, help="Adam learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="run every row once per seed; with several, report mean (min-max) "
        "(default: %(default)s)",
    )
    parser.add_argument("--device", help="the torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="validate every N steps (default: once per epoch, as the official code; --quick: "
        f"{QUICK['val_every']}); the checkpoint with the lowest validation MSE is the one scored",
    )
    parser.add_argument(
        "--mnist",
        default=DEFAULT_MNIST,
        help="directory of t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
        f"(default: ${MNIST_ENV}, else {MNIST_FALLBACK})",
    )
    parser.add_argument(
        "--out", default="runs/reproduce", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--no-lpips-fid",
        action="store_true",
        help="do not compute LPIPS and rFID even when their weights are present",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK['steps']} steps, batch {QUICK['batch_size']}, "
        f"two or three rows per table, {QUICK['val_images']} validation images",
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()  # --help exits here, before torch is imported
    import torch

    from tokenizer.experiments.reproduce import (
        RunConfig,
        load_mnist,
        load_runs,
        optional_metrics,
        run_tables,
        select_tables,
        write_outputs,
    )

    check_copies()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tables = select_tables(args.table)
    except ValueError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    defaults = QUICK if args.quick else {}
    given = dict(steps=args.steps, batch_size=args.batch_size, val_every=args.val_every)
    config = RunConfig(
        lr=args.lr,
        seeds=args.seeds,
        device=args.device,
        **{**defaults, **{k: v for k, v in given.items() if v is not None}},
    )
    try:
        done = load_runs(os.path.join(args.out, "results.json"), config)
    except ValueError as e:
        parser.error(str(e))
    data = load_mnist(args.mnist)
    scorers, skipped = optional_metrics(torch.device(args.device), not args.no_lpips_fid)
    for metric, why in skipped.items():
        print(f"{metric}: skipped ({why})")
    rows = QUICK_ROWS if args.quick else None
    print(
        f"MNIST: {len(data['train'])} train / {len(data['val'])} validation images; tables "
        f"{tables}; {config.steps} steps, batch {config.batch_size}, seeds {config.seeds}, "
        f"validation every {config.validation_interval(len(data['train']))} steps, on "
        f"{config.device}",
        flush=True,
    )
    start = time.perf_counter()
    results = run_tables(
        tables,
        data,
        config,
        scorers,
        log=lambda line: print(line, flush=True),
        rows=rows,
        done=done,
        saved=lambda runs: write_outputs(runs, config, skipped, args.out),
    )
    text = write_outputs(results, config, skipped, args.out)
    print()
    print(text)
    print(
        f"wrote {args.out}/table.md, results.json, usage.png "
        f"({(time.perf_counter() - start) / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
