"""Nearest-code search: time and extra peak memory of our tiled search (alone, and with the CVQ
anchor candidates of the same pass) against the full-matrix search (argmax over the whole N×K
matrix) and the official code's full sort.

    python scripts/benchmark_search.py [--n 2097152] [--k 1024] [--d 4] [--device cpu]

Defaults: LooC at the paper's FFHQ setting, batch 32 of 256-channel 16×16 latents up-sampled
×2 and split into d*=4 segments: N = 32·32·32·64 = 2,097,152 vectors, K = 1024.
Each method runs in its own process so peak memory is its own; "extra" is the peak growth over
the inputs, less the N indices returned (what no method can avoid).
"""

import argparse
import json
import subprocess
import sys
import time

METHODS = [
    "tiled search (ours)",
    "tiled search + closest anchors (ours)",
    "full matrix argmax",
    "full sort",
]


def run_one(method: str, n: int, k: int, d: int, device: str) -> dict:
    import resource

    import torch

    from tokenizer.quantizers.search import nearest_code, search_and_anchor

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, d, generator=g, device=device)
    codebook = torch.randn(k, d, generator=g, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = torch.cuda.max_memory_allocated() if device == "cuda" else rss

    def search():
        if method == "tiled search (ours)":
            return nearest_code(x, codebook, "l2")
        if method == "tiled search + closest anchors (ours)":
            return search_and_anchor(x, codebook, "l2", anchor="closest").indices
        scores = 2 * x @ codebook.t() - codebook.pow(2).sum(1)
        if method == "full matrix argmax":
            return scores.argmax(1)
        return scores.sort(dim=1).indices[:, -1]  # the official code's search

    out = search()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        out = None  # the previous result is not part of this search's memory
        out = search()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    peak -= out.numel() * out.element_size()
    return {
        "seconds": (time.perf_counter() - start) / 3,
        "peak_bytes": peak,
        "checksum": int(out.sum()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, default=2_097_152, help="vectors searched (default: %(default)s)"
    )
    parser.add_argument("--k", type=int, default=1024, help="codebook size (default: %(default)s)")
    parser.add_argument(
        "--d", type=int, default=4, help="dimension of the vectors and codes (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=METHODS,
        metavar="METHOD",
        help="the methods to time, each in its own process (default: all: "
        + "; ".join(METHODS)
        + ")",
    )
    parser.add_argument("--_one", help=argparse.SUPPRESS)  # one method, in this process
    return parser


def main() -> None:
    args = build_parser().parse_args()  # --help exits here, before torch is imported
    if args._one:
        print(json.dumps(run_one(args._one, args.n, args.k, args.d, args.device)))
        return

    print(f"N={args.n:,} vectors of d={args.d}, K={args.k} codes, {args.device}\n")
    print("| method | time per search | extra peak memory | same codes |")
    print("|---|---|---|---|")
    reference = None
    for method in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--n",
            str(args.n),
            "--k",
            str(args.k),
            "--d",
            str(args.d),
            "--device",
            args.device,
            "--_one",
            method,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {method} | failed: {done.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(done.stdout)
        reference = r["checksum"] if reference is None else reference
        print(
            f"| {method} | {r['seconds']:.3f} s | {r['peak_bytes'] / 2**20:,.1f} MiB "
            f"| {'yes' if r['checksum'] == reference else 'no'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
