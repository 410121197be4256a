"""What every benchmark family shares: timing a step (:func:`measure`), the rows of the table
(:func:`row`, :func:`skipped`) and the table itself (:func:`table`), the machine's matrix-product
rate against which the quantizer searches are set (:func:`matmul_rate`,
:func:`arithmetic_limit`), and the miniature tokenizer of ``configs/tokenizer/tiny.yaml``."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY_TOKENIZER = ROOT / "configs" / "tokenizer" / "tiny.yaml"


def measure(step, device: torch.device, steps: int, warmup: int) -> tuple[float, int | None]:
    """Median seconds of ``step()`` over ``steps`` calls after ``warmup`` calls, and its peak
    memory growth in bytes (CUDA; None elsewhere)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return statistics.median(times), peak


def row(family, what, setting, seconds, peak, count, unit, notes="") -> dict:
    """A row of the table: ``count`` items (of ``unit``, per second) done in ``seconds``."""
    return {
        "family": family,
        "what": what,
        "setting": setting,
        "seconds": seconds,
        "throughput": count / seconds,
        "unit": unit,
        "peak_bytes": peak,
        "notes": notes,
    }


def skipped(family, what, setting, notes) -> dict:
    """A row that was not measured, ``notes`` saying why: no time, no throughput."""
    return {
        "family": family,
        "what": what,
        "setting": setting,
        "seconds": None,
        "throughput": None,
        "unit": "",
        "peak_bytes": None,
        "notes": notes,
    }


def matmul_rate(device: torch.device) -> float:
    """The machine's float32 matrix-product rate (FLOP/s): a 1024³ product, median of 5."""
    a, b = (torch.randn(1024, 1024, device=device) for _ in range(2))
    seconds, _ = measure(lambda: a @ b, device, 5, 1)
    return 2 * 1024**3 / seconds


def arithmetic_limit(seconds: float, n: int, k: int, d: int, rate: float) -> str:
    """The search's N×K×d products against the machine's rate: the time no search can beat."""
    flops = 2 * n * k * d
    limit = flops / rate
    return (
        f"search {flops / 1e9:.2f} GFLOP: {limit * 1000:.0f} ms at {rate / 1e9:.0f} GFLOP/s, "
        f"{seconds / limit:.1f}x the limit"
    )


def tiny_tokenizer_model() -> dict:
    """The ``model`` section of ``configs/tokenizer/tiny.yaml``: the miniature tokenizer's
    ``VQTokenizer`` arguments (latents 4×8×8 at 16 px)."""
    return yaml.safe_load(TINY_TOKENIZER.read_text())["model"]


def table(rows: list[dict], device: torch.device, size: str) -> str:
    """The rows as one Markdown table, under a line naming the device, threads, torch and sizes."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"Device: {name} ({device.type}, {torch.get_num_threads()} threads), torch "
        f"{torch.__version__}, sizes: {size}",
        "",
        "| what | setting | time | throughput | peak memory | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        time_ = f"{r['seconds'] * 1000:.1f} ms" if r["seconds"] is not None else "-"
        rate = f"{r['throughput']:,.1f} {r['unit']}" if r["throughput"] is not None else "-"
        peak = f"{r['peak_bytes'] / 2**20:,.0f} MiB" if r["peak_bytes"] is not None else "-"
        lines.append(f"| {r['what']} | {r['setting']} | {time_} | {rate} | {peak} | {r['notes']} |")
    return "\n".join(lines)


def write_json(path: str | Path, rows: list[dict], device: torch.device, size: str) -> None:
    """The rows, with the device, the torch version and the sizes, as JSON at ``path``."""
    Path(path).write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "size": size,
                "rows": rows,
            },
            indent=1,
        )
    )
