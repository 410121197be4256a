"""The ``cache`` family: resident memory and latents/s of a latent cache by cache size and
process count, memory-mapped (ours) against loaded whole (format 1)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import ROOT, row

CACHE_READER = r"""
import json, sys, time
import torch
from torch.utils.data import DataLoader
from diffusion.latent_cache import LatentCache

def memory():  # resident (anonymous, file-backed) and proportional set size, in bytes
    fields = {}
    for name in ("/proc/self/status", "/proc/self/smaps_rollup"):
        for line in open(name):
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "Pss"):
                fields[key] = int(value.split()[0]) * 1024
    return fields

root, rank, world, in_memory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
before = memory()
cache = LatentCache(root)
if in_memory:  # what format 1 did: every shard read into this process
    latents, labels = cache.load()
    class Cache(torch.utils.data.Dataset):
        def __len__(self): return len(labels)
        def __getitem__(self, i): return {"latents": latents[i], "label": labels[i]}
    cache = Cache()
opened = memory()
order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(0))[rank::world]
loader = DataLoader(cache, batch_sampler=(b.tolist() for b in order.split(64)))
start = time.perf_counter()
for batch in loader:
    pass
seconds = time.perf_counter() - start
print(json.dumps({"before": before, "opened": opened, "epoch": memory(), "items": len(order),
                  "seconds": seconds}))
"""


def _synthetic_cache(root: Path, count: int, shape=(4, 32, 32)) -> None:
    """A complete latent cache of ``count`` random float32 latents, without a tokenizer."""
    from diffusion.latent_cache import FORMAT, complete_cache, write_shard

    shard_size = 4096
    root.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for k, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        write_shard(
            root,
            k,
            [torch.randn(n, *shape, generator=generator)],
            [torch.randint(0, 1000, (n,), generator=generator)],
            range(start, start + n),
        )
    settings = {
        "format": FORMAT,
        "data": {},
        "part": "train",
        "quantized": True,
        "flips": False,
        "dtype": "float32",
        "precision": "no",
    }
    complete_cache(root, settings, count, shard_size)


def bench_cache(args, device) -> list[dict]:
    """Per-process resident memory on opening a latent cache and after one epoch over it, and
    latents/s, for caches of about 64 MB, 256 MB and 1 GB (tiny: 4 and 16 MB), with 1 and 2
    processes reading disjoint halves, memory-mapped (ours) and loaded whole (format 1)."""
    import subprocess
    import sys

    sizes = [64, 256, 1024] if args.size == "real" else [4, 16]
    rows = []
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for mib in sizes:
            root = Path(tmp) / f"cache{mib}"
            count = mib * 2**20 // (4 * 32 * 32 * 4)
            _synthetic_cache(root, count)
            size = sum(p.stat().st_size for p in root.iterdir())
            for in_memory in ("0", "1") if mib <= 256 else ("0",):
                for world in (1, 2):
                    procs = [
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-c",
                                CACHE_READER,
                                str(root),
                                str(r),
                                str(world),
                                in_memory,
                            ],
                            env=env,
                            stdout=subprocess.PIPE,
                            text=True,
                        )
                        for r in range(world)
                    ]
                    reports = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
                    r = reports[0]
                    opened = (
                        r["opened"]["RssAnon"]
                        + r["opened"]["RssFile"]
                        - r["before"]["RssAnon"]
                        - r["before"]["RssFile"]
                    )
                    anon = r["epoch"]["RssAnon"] - r["before"]["RssAnon"]
                    seconds = max(x["seconds"] for x in reports)
                    items = sum(x["items"] for x in reports)
                    kind = "loaded whole (format 1)" if in_memory == "1" else "memory-mapped"
                    rows.append(
                        row(
                            "cache",
                            f"latent cache, {kind}",
                            f"{size / 2**20:,.0f} MiB, {world} process{'es' if world > 1 else ''}",
                            seconds,
                            None,
                            items,
                            "latents/s",
                            f"per process: +{opened / 2**20:,.1f} MiB resident on opening "
                            f"({100 * opened / size:.1f}% of the cache); after the epoch "
                            f"+{anon / 2**20:,.1f} MiB private, PSS "
                            f"+{(r['epoch']['Pss'] - r['before']['Pss']) / 2**20:,.0f} MiB",
                        )
                    )
            __import__("shutil").rmtree(root)
    return rows
