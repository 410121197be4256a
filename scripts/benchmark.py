"""Speed and memory of the hot paths, as one Markdown table: quantizer forward+backward (and its
ratio to the machine's arithmetic limit), the quantizers at large codebooks (time and peak
extra memory at K up to 262,144), what a training step waits for (device reads and
collectives per step, on two processes), tokenizer and UNet training steps, sampling, Inception
feature extraction, the latent cache (resident memory and latents/s by cache size and process
count) and the data path (listing a folder, encoding a latent cache).

    python scripts/benchmark.py [--size tiny|real] [--device cuda] [--json rows.json]
        [--only quantizer,codebooks,launches,waits,tokenizer,unet,sampling,inception,cache,data]
        [--load]
        [--codebook-sizes 1024,16384,262144] [--codebook-rows 2048,65536]
        [--inception-weights PATH | --random-inception] [--tokenizer-config YAML]

--size defaults to "real" (the papers' settings) on CUDA and "tiny" (smoke sizes) on CPU. Times
are medians over timed steps after warm-up; on CUDA the device is synchronised only around each
timed step, and peak memory is the growth of torch.cuda.max_memory_allocated over the step
("-" on CPU). Random weights throughout: these are speeds, not results.

The rows are measured by the ``benchmarks`` package (benchmarks/, a module per family, what they
share in benchmarks/common.py); this script is its command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli import same_as_library

ROOT = Path(__file__).resolve().parents[1]

# benchmarks.FAMILIES, copied for --help, which answers before torch is imported, and compared
# with the package's right after the import (check_copies)
FAMILIES = (
    "quantizer",
    "codebooks",
    "launches",
    "waits",
    "tokenizer",
    "unet",
    "sampling",
    "inception",
    "cache",
    "data",
)


def check_copies() -> None:
    import benchmarks

    same_as_library("benchmarks.FAMILIES", FAMILIES, benchmarks.FAMILIES)


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=["tiny", "real"],
        default=None,
        help="the papers' settings (real) or smoke sizes (tiny) (default: real on CUDA, tiny "
        "elsewhere)",
    )
    parser.add_argument(
        "--device", help="the torch device to measure on (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--only",
        default=",".join(FAMILIES),
        help="comma-separated subset of the families to run (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (default: 10 real, 3 tiny; sampling uses half)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 3 real, 1 tiny)"
    )
    parser.add_argument(
        "--tokenizer-config",
        metavar="YAML",
        help="the tokenizer row's config (default: ffhq_f16_cvq.yaml real, digits_demo.yaml tiny)",
    )
    parser.add_argument(
        "--codebook-sizes",
        type=int_list,
        default=[1024, 16384, 262144],
        help="codebooks family: the K to measure (default: 1024,16384,262144)",
    )
    parser.add_argument(
        "--codebook-rows",
        type=int_list,
        default=[2048, 65536],
        help="codebooks family: the N rows (multiples of 256) to measure (default: 2048,65536)",
    )
    parser.add_argument(
        "--load",
        action="store_true",
        help="CPU quantizer rows: also with 1 thread and beside a busy process (default: only "
        "all threads on an idle machine)",
    )
    parser.add_argument(
        "--json", metavar="OUT", help="also write the rows as JSON to OUT (default: not written)"
    )
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="torch-fidelity's Inception weights file (default: the torch hub cache's, never "
        "downloaded; without one the inception row is skipped)",
    )
    parser.add_argument(
        "--random-inception",
        action="store_true",
        help="time Inception with random weights if no weights file is found (default: skip it)",
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()  # --help exits here, before torch is imported
    import torch
    from diffusers.utils import logging as diffusers_logging

    import benchmarks

    check_copies()
    diffusers_logging.set_verbosity_error()  # casting pipelines to bf16/fp16 warns every time
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    args.size = args.size or ("real" if device.type == "cuda" else "tiny")
    args.steps = args.steps or (10 if args.size == "real" else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.size == "real" else 1)
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(only) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {','.join(FAMILIES)}")
    rows = benchmarks.run(only, args, device)
    print(benchmarks.table(rows, device, args.size))
    if args.json:
        benchmarks.write_json(args.json, rows, device, args.size)


if __name__ == "__main__":
    main()
