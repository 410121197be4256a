"""The ``codebooks`` family: the quantizers at large codebooks (K up to 262,144), each case in
its own process, timed, with its peak extra memory."""

from __future__ import annotations

import json
import math

import torch

from benchmarks.common import ROOT, row, skipped

# One case of the codebook-size grid, in its own process: forward + backward of a quantizer on N
# random rows, timed, then once more for the peak memory in use beyond the quantizer and the
# inputs (allocated memory on CUDA; on the CPU glibc's bytes in use, read after every operator,
# so a temporary that lives inside one operator is not seen).
CODEBOOK_CASE = """
import ctypes, json, statistics, sys, time
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tokenizer.quantizers import build_quantizer

kind, options, n, device, steps = json.loads(sys.argv[1])
device = torch.device(device)
torch.manual_seed(0)
q = build_quantizer(kind, **options).to(device).train()
z = torch.randn(n // 256, q.code_dim, 16, 16, device=device, requires_grad=True)
cuda = device.type == "cuda"
sync = torch.cuda.synchronize if cuda else lambda: None


def step():
    out = q(z)
    (out.z_q.float().pow(2).mean() + out.loss).backward()


class Info(ctypes.Structure):  # glibc's mallinfo2: bytes in use (heap and mmapped blocks)
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info


def in_use():
    info = mallinfo2()
    return info.uordblks + info.hblkhd


class HeapPeak(TorchDispatchMode):  # the bytes in use after every operator
    peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, in_use())
        return out


times = []
for i in range(steps + 1):  # the first is the warm-up
    sync()
    start = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - start)
z.grad = None
q.zero_grad(set_to_none=True)
if cuda:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - base
else:
    base = in_use()
    with HeapPeak() as mode:
        step()
    peak = mode.peak - base
print(json.dumps({"seconds": statistics.median(times[1:] or times), "peak": peak}))
"""


def bench_codebooks(args, device) -> list[dict]:
    """Forward + backward of VQ, CVQ, SimVQ, IBQ (d = 8) and LFQ (d = log2 K) at the codebook
    sizes and row counts of ``--codebook-sizes`` / ``--codebook-rows`` (default K = 1,024,
    16,384, 262,144 and N = 2,048, 65,536), each in its own process: time, peak extra memory,
    and the N×K float32 scores a dense formulation holds (IBQ's dense form holds several)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    rows = []
    for k in args.codebook_sizes:
        for n in args.codebook_rows:
            for kind in ("vq", "cvq", "simvq", "ibq", "lfq"):
                if kind == "lfq":
                    options = dict(code_dim=round(math.log2(k)))
                    if 2 ** options["code_dim"] != k:
                        continue
                else:
                    options = dict(num_codes=k, code_dim=8)
                    options.update(
                        {"vq": dict(distance="l2"), "cvq": dict(anchor="closest")}.get(kind, {})
                    )
                setting = f"K={k:,}, N={n:,}, " + ", ".join(f"{a}={b}" for a, b in options.items())
                steps = 1 if n * k > 2**30 else args.steps  # the largest cases: one timed step
                case = json.dumps([kind, options, n, device.type, steps])
                done = subprocess.run(
                    [sys.executable, "-c", CODEBOOK_CASE, case],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=ROOT,
                )
                what = f"{kind.upper() if kind != 'simvq' else 'SimVQ'} fwd+bwd, large codebook"
                if done.returncode != 0:
                    error = (done.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append(skipped("codebooks", what, setting, f"failed: {error}"))
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                dense = n * k * 4 / 2**20
                notes = f"dense N×K scores: {dense:,.0f} MiB"
                rows.append(
                    row("codebooks", what, setting, r["seconds"], r["peak"], n, "rows/s", notes)
                )
    return rows
