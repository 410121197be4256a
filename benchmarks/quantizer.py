"""The ``quantizer`` family: forward + backward of LooC (tiled and dense search), CVQ and
vector-quantize-pytorch's multi-head VQ on random latents, and on the CPU the performance
issue's cases with their targets, each with its ratio to the machine's arithmetic limit."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time

import torch

from benchmarks.common import arithmetic_limit, matmul_rate, measure, row, skipped

CPU_CASES = [  # what, quantizer, options, latent shape, target on a 2-core CPU
    (
        "LooC fwd+bwd, MNIST setting, closest",
        "looc",
        dict(num_codes=256, code_dim=4, interp_scale=2, distance="cosine", anchor="closest"),
        (64, 128, 7, 7),
        "target <= 200 ms (2 threads)",
    ),
    (
        "LooC fwd+bwd, MNIST setting, probabilistic",
        "looc",
        dict(num_codes=256, code_dim=4, interp_scale=2, distance="cosine"),
        (64, 128, 7, 7),
        "target <= 300 ms (2 threads)",
    ),
    (
        "LooC fwd+bwd, f16 setting, closest",
        "looc",
        dict(num_codes=1024, code_dim=4, interp_scale=2, distance="cosine", anchor="closest"),
        (2, 256, 16, 16),
        "target <= 200 ms (2 threads)",
    ),
    (
        "CVQ fwd+bwd, MNIST setting, closest",
        "cvq",
        dict(num_codes=1024, code_dim=128, distance="cosine", anchor="closest"),
        (64, 128, 7, 7),
        "target <= 60 ms (2 threads)",
    ),
    (
        "CVQ fwd+bwd, MNIST setting, probabilistic",
        "cvq",
        dict(num_codes=1024, code_dim=128, distance="cosine"),
        (64, 128, 7, 7),
        "target <= 60 ms (2 threads)",
    ),
]


@contextlib.contextmanager
def neighbour(busy: bool):
    """A process spinning on one core for the duration of the block (when ``busy``): the shared
    machine's other jobs, made repeatable."""
    if not busy:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        process.kill()
        process.wait()


def bench_quantizer(args, device) -> list[dict]:
    """Forward + backward of a quantizer on random latents: LooC (chunked and dense search), CVQ,
    and vector-quantize-pytorch's multi-head VQ at LooC's shape."""
    from tokenizer.quantizers import build_quantizer
    from tokenizer.quantizers.search import search_budget, tile_shape, tiles_per_search

    real = args.size == "real"
    b, side, k = (32, 16, 1024) if real else (2, 8, 256)
    looc_c, cvq_d = (256, 256) if real else (32, 32)
    torch.manual_seed(0)

    def time_quantizer(quantizer, z):
        def step():
            out = quantizer(z)
            (out.z_q.float().pow(2).mean() + out.loss).backward()

        return measure(step, device, args.steps, args.warmup)

    rows, rate = [], matmul_rate(device)
    n_looc = b * (side * 2) ** 2 * (looc_c // 4)  # beta=2 up-sampling, d*=4 segments
    # the device's budget; tiny sizes fit one CPU tile: search in 8 tiles there (the tiled path)
    tiled = None if real else n_looc * k // 8 * 4
    for search, max_bytes in (("tiled", tiled), ("one-tile (dense)", 2**62)):
        q = (
            build_quantizer(
                "looc", num_codes=k, code_dim=4, interp_scale=2, max_search_bytes=max_bytes
            )
            .to(device)
            .train()
        )
        z = torch.randn(b, looc_c, side, side, device=device, requires_grad=True)
        seconds, peak = time_quantizer(q, z)
        elements = search_budget(device, max_bytes)
        tiles = tiles_per_search(n_looc, k, elements)
        rows.append(
            row(
                "quantizer",
                f"LooC fwd+bwd, {search} search",
                f"K={k}, d*=4, {b}x{looc_c}x{side}x{side}, beta=2",
                seconds,
                peak,
                n_looc,
                "vectors/s",
                (
                    f"N={n_looc:,}, {tiles} tiles of {tile_shape(n_looc, k, elements)[0]:,} rows"
                    if tiles > 1
                    else f"N={n_looc:,}"
                )
                + f"; {arithmetic_limit(seconds, n_looc, k, 4, rate)}",
            )
        )
    if device.type == "cpu":  # the performance issue's CPU cases, with their targets
        threads = torch.get_num_threads()
        for what, kind, options, shape, target in CPU_CASES:
            q = build_quantizer(kind, **options).to(device).train()
            z = torch.randn(*shape, device=device, requires_grad=True)
            n = math.prod(shape) // options["code_dim"] * options.get("interp_scale", 1) ** 2
            setting = ", ".join(f"{key}={value}" for key, value in options.items())
            setting += f", {'x'.join(map(str, shape))}"
            k, d = options["num_codes"], options["code_dim"]
            # with 1 and 2 threads, beside an idle machine and beside a busy process
            for count, busy in ((threads, False), (1, False), (threads, True), (1, True)):
                if (count, busy) != (threads, False) and not args.load:
                    continue
                torch.set_num_threads(count)
                with neighbour(busy):
                    seconds, peak = time_quantizer(q, z)
                torch.set_num_threads(threads)
                notes = f"{target}; {arithmetic_limit(seconds, n, k, d, rate)}"
                label = f"{what}, {count} thread(s)" + (", a busy neighbour" if busy else "")
                rows.append(row("quantizer", label, setting, seconds, peak, n, "vectors/s", notes))
    q = build_quantizer("cvq", num_codes=k, code_dim=cvq_d).to(device).train()
    z = torch.randn(b, cvq_d, side, side, device=device, requires_grad=True)
    seconds, peak = time_quantizer(q, z)
    n = b * side * side
    rows.append(
        row(
            "quantizer",
            "CVQ fwd+bwd",
            f"K={k}, d={cvq_d}, {b}x{cvq_d}x{side}x{side}",
            seconds,
            peak,
            n,
            "vectors/s",
            f"N={n:,}, anchors: probabilistic",
        )
    )
    what, setting = (
        "vector-quantize-pytorch fwd+bwd",
        f"{looc_c // 4} heads x 1 shared codebook K={k}, d=4, {b}x{looc_c}x{2 * side}x{2 * side}",
    )
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return rows + [skipped("quantizer", what, setting, "not installed")]
    try:  # a third-party API: a version that differs gives a row that says so, not a crash
        vq = VectorQuantize(
            dim=looc_c,
            codebook_size=k,
            codebook_dim=4,
            heads=looc_c // 4,
            separate_codebook_per_head=False,
            accept_image_fmap=True,
        ).to(device)
        z = torch.randn(b, looc_c, 2 * side, 2 * side, device=device, requires_grad=True)

        def vq_step():
            quantized, _, loss = vq(z)
            (quantized.pow(2).mean() + loss.sum()).backward()

        seconds, peak = measure(vq_step, device, args.steps, args.warmup)
    except (TypeError, ValueError, RuntimeError) as e:
        return rows + [skipped("quantizer", what, setting, f"failed: {type(e).__name__}: {e}")]
    return rows + [
        row("quantizer", what, setting, seconds, peak, n_looc, "vectors/s", f"N={n_looc:,}")
    ]
