"""Speed and memory of the hot paths, a module per family of rows (``scripts/benchmark.py`` is
its command line): quantizer, codebooks, launches, waits, tokenizer, unet, sampling, inception,
cache, data; what they share (timing, rows, the table) is in :mod:`benchmarks.common`.

Each family is a function ``(args, device) -> list[dict]`` of the parsed command line (``size``,
``steps``, ``warmup`` and the family's own options) and a ``torch.device``; :func:`run` calls
the selected ones in the table's order."""

from __future__ import annotations

import torch

from benchmarks.cache import bench_cache
from benchmarks.codebooks import bench_codebooks
from benchmarks.common import table, write_json
from benchmarks.data import bench_data
from benchmarks.inception import bench_inception
from benchmarks.launches import bench_launches
from benchmarks.quantizer import bench_quantizer
from benchmarks.sampling import bench_sampling
from benchmarks.tokenizer import bench_tokenizer
from benchmarks.unet import bench_unet
from benchmarks.waits import bench_waits

BENCHMARKS = {
    "quantizer": bench_quantizer,
    "codebooks": bench_codebooks,
    "launches": bench_launches,
    "waits": bench_waits,
    "tokenizer": bench_tokenizer,
    "unet": bench_unet,
    "sampling": bench_sampling,
    "inception": bench_inception,
    "cache": bench_cache,
    "data": bench_data,
}
FAMILIES = tuple(BENCHMARKS)

__all__ = ["BENCHMARKS", "FAMILIES", "run", "table", "write_json"]


def run(only, args, device: torch.device) -> list[dict]:
    """The rows of the families in ``only``, in the order of :data:`FAMILIES`."""
    rows = []
    for family in FAMILIES:
        if family in only:
            rows += BENCHMARKS[family](args, device)
    return rows
