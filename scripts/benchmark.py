"""Speed and memory of the hot paths, as one Markdown table: quantizer forward+backward (and its
ratio to the machine's arithmetic limit), the quantizers at large codebooks (time and peak
extra memory at K up to 262,144), what a training step waits for (device reads and
collectives per step, on two processes), tokenizer and UNet training steps, sampling, Inception
feature extraction, the latent cache (resident memory and latents/s by cache size and process
count) and the data path (listing a folder, encoding a latent cache).

    python scripts/benchmark.py [--size tiny|real] [--device cuda] [--json rows.json]
        [--only quantizer,codebooks,waits,tokenizer,unet,sampling,inception,cache,data]
        [--codebook-sizes 1024,16384,262144] [--codebook-rows 2048,65536]
        [--inception-weights PATH | --random-inception] [--tokenizer-config YAML]

--size defaults to "real" (the papers' settings) on CUDA and "tiny" (smoke sizes) on CPU. Times
are medians over timed steps after warm-up; on CUDA the device is synchronised only around each
timed step, and peak memory is the growth of torch.cuda.max_memory_allocated over the step
("-" on CPU). Random weights throughout: these are speeds, not results.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = (
    "quantizer",
    "codebooks",
    "waits",
    "tokenizer",
    "unet",
    "sampling",
    "inception",
    "cache",
    "data",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


# ------------------------------------------------------------------------------------ rows


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


def bench_quantizer(args, device) -> list[dict]:
    """Forward + backward of a quantizer on random latents: LooC (chunked and dense search), CVQ,
    and vector-quantize-pytorch's multi-head VQ at LooC's shape."""
    from tokenizer.quantizers import build_quantizer
    from tokenizer.quantizers.search import DEFAULT_TILE_ELEMENTS

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
    # tiny sizes fit one default tile: search in 8 tiles there so the tiled path runs
    tiled = DEFAULT_TILE_ELEMENTS if real else n_looc * k // 8
    for search, max_elements in (("tiled", tiled), ("one-tile (dense)", 2**62)):
        q = (
            build_quantizer(
                "looc", num_codes=k, code_dim=4, interp_scale=2, max_search_elements=max_elements
            )
            .to(device)
            .train()
        )
        z = torch.randn(b, looc_c, side, side, device=device, requires_grad=True)
        seconds, peak = time_quantizer(q, z)
        chunks = math.ceil(n_looc / max(1, max_elements // k))
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
                    f"N={n_looc:,}, {chunks} tiles of <= {max_elements // k:,} rows"
                    if chunks > 1
                    else f"N={n_looc:,}"
                )
                + f"; {arithmetic_limit(seconds, n_looc, k, 4, rate)}",
            )
        )
    if device.type == "cpu":  # the performance issue's CPU cases, with their targets
        for what, kind, options, shape, target in CPU_CASES:
            q = build_quantizer(kind, **options).to(device).train()
            z = torch.randn(*shape, device=device, requires_grad=True)
            seconds, peak = time_quantizer(q, z)
            n = math.prod(shape) // options["code_dim"] * options.get("interp_scale", 1) ** 2
            setting = ", ".join(f"{key}={value}" for key, value in options.items())
            setting += f", {'x'.join(map(str, shape))}"
            k, d = options["num_codes"], options["code_dim"]
            notes = f"{target}; {arithmetic_limit(seconds, n, k, d, rate)}"
            rows.append(row("quantizer", what, setting, seconds, peak, n, "vectors/s", notes))
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


def bench_waits(args, device) -> list[dict]:
    """Device reads and collectives per training step (scripts/count_waits.py) on two CPU
    processes: the digits LooC tokenizer in bf16 with 2 micro-batches per step and the
    discriminator on, then the class-conditional UNet on its latents. The counts do not depend
    on the device; the middle steps are shown (not the first, nor the last, which logs)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", "29655"]
    common = ["--steps", "4", "train.batch_size=4", "train.mixed_precision=bf16"]
    common += ["train.gradient_accumulation_steps=2", "data.validation_size=8"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stages = {
            "tokenizer": ["--config", "configs/tokenizer/digits_looc.yaml", "loss.disc_start=0"],
            "diffusion": [
                "--config",
                "configs/diffusion/digits_cond.yaml",
                "--tokenizer",
                f"{tmp}/tokenizer/tokenizer",
            ],
        }
        for stage, extra in stages.items():
            out = f"{tmp}/{stage}"
            command = [*launch, "scripts/count_waits.py", stage, "--output_dir", out]
            start = time.perf_counter()
            done = subprocess.run(
                [*command, *common, *extra], cwd=ROOT, env=env, capture_output=True, text=True
            )
            seconds = time.perf_counter() - start
            setting = f"{extra[1]}, 2 processes, bf16, 2 micro-batches per step"
            if done.returncode != 0:
                rows.append(skipped("waits", f"{stage} step", setting, "failed: see stderr"))
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            middle = json.loads(Path(out, "waits-1.json").read_text())[1:-1]
            host = "torch/optim/optimizer.py:_get_value"  # Adam's step counters, on the host
            reads = max(sum(n for p, n in r["reads"].items() if host not in p) for r in middle)
            collectives = max(sum(r["collectives"].values()) for r in middle)
            places = sorted({p.split(" → ")[0] for r in middle for p in r["collectives"]})
            rows.append(
                row(
                    "waits",
                    f"{stage} step: device reads / collectives (time: the whole counted run)",
                    setting,
                    seconds,
                    None,
                    len(middle) + 2,
                    "steps/s (counted, whole run)",
                    f"{reads} read(s), {collectives} collective(s) per step ({', '.join(places)})",
                )
            )
    return rows


def tokenizer_step_time(
    config: str, batch_size: int, precision: str, device: torch.device, steps: int, warmup: int
) -> tuple[float, int | None]:
    """Median time and peak memory of one full tokenizer training step (generator + discriminator,
    the GAN on from step 0) of ``config`` on random images, no data loading."""
    from engine.config import from_mapping
    from tokenizer.losses import VQGANLoss
    from tokenizer.model import VQTokenizer
    from tokenizer.train import TokenizerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe = from_mapping(TokenizerConfig, yaml.safe_load(open(config)))
    recipe.loss.disc_start = 0  # measure the full GAN step
    model = VQTokenizer(**recipe.model).to(device).train()
    try:
        loss_fn = VQGANLoss(recipe.loss).to(device)
    except FileNotFoundError:  # no VGG16 weights here: time LPIPS with a random backbone
        loss_fn = VQGANLoss(recipe.loss, lpips_pretrained=False).to(device)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = (
        torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
        if loss_fn.discriminator is not None
        else None
    )
    r, c = recipe.model.get("resolution", 256), recipe.model.get("in_channels", 3)
    x = torch.rand(batch_size, c, r, r, device=device) * 2 - 1
    autocast = dict(device_type=device.type, dtype=DTYPES[precision], enabled=precision != "fp32")

    def step():
        with torch.autocast(**autocast):
            out = model(x)
            g, _ = loss_fn.generator_loss(x, out.sample, out.quantized.loss, model.last_layer, 0)
        g.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if opt_d is not None:
            with torch.autocast(**autocast):
                d, _ = loss_fn.discriminator_loss(x, out.sample.detach(), 0)
            d.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

    return measure(step, device, steps, warmup)


def bench_tokenizer(args, device) -> list[dict]:
    """Tokenizer training images/s: fp32 eager against our default (bf16 autocast on CUDA)."""
    real = args.size == "real"
    config = args.tokenizer_config or "configs/tokenizer/" + (
        "ffhq_f16_cvq.yaml" if real else "digits_demo.yaml"
    )
    batch = 8 if real else 4
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    rows = []
    for precision in precisions:
        path = config if Path(config).is_file() else ROOT / config
        seconds, peak = tokenizer_step_time(
            str(path), batch, precision, device, args.steps, args.warmup
        )
        notes = "G + D step, Adam" + ("; the default on CPU" if device.type != "cuda" else "")
        label = "eager" if precision == "fp32" else "autocast (default)"
        rows.append(
            row(
                "tokenizer",
                f"tokenizer training, {precision} {label}",
                f"{config}, batch {batch}",
                seconds,
                peak,
                batch,
                "images/s",
                notes,
            )
        )
    return rows


def bench_unet(args, device) -> list[dict]:
    """UNet training latents/s: epsilon-prediction MSE, AdamW step."""
    from diffusion.unet import UNetConfig, build_unet, training_scheduler

    real = args.size == "real"
    config = "configs/diffusion/" + ("lsun_churches.yaml" if real else "digits_uncond.yaml")
    channels, side, batch = (4, 32, 32) if real else (4, 8, 8)
    unet_config = UNetConfig(**yaml.safe_load(open(ROOT / config))["unet"])
    torch.manual_seed(0)
    unet = build_unet(unet_config, channels, side).to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    scheduler = training_scheduler()
    x0 = torch.randn(batch, channels, side, side, device=device)
    noise = torch.randn_like(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
    xt = scheduler.add_noise(x0, noise, t)
    rows = []
    for precision in ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]:

        def step():
            with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
                loss = F.mse_loss(unet(xt, t).sample.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        seconds, peak = measure(step, device, args.steps, args.warmup)
        rows.append(
            row(
                "unet",
                f"UNet training, {precision}",
                f"{config} unet, {batch}x{channels}x{side}x{side}",
                seconds,
                peak,
                batch,
                "latents/s",
                f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params, AdamW",
            )
        )
    return rows


def bench_sampling(args, device) -> list[dict]:
    """Sampling images/s: our LatentDiffusionPipeline against diffusers' LDMPipeline on the same
    components (DDIM, eta 0), plus ours in bf16/fp16 on CUDA."""
    from diffusers import LDMPipeline

    from diffusion.unet import UNetConfig, build_unet
    from pipelines import LatentDiffusionPipeline, default_scheduler
    from tokenizer import VQTokenizer

    real = args.size == "real"
    torch.manual_seed(0)
    if real:
        raw = yaml.safe_load(open(ROOT / "configs/tokenizer/ffhq_f8_cvq.yaml"))["model"]
        vqvae = VQTokenizer(**raw)
        unet = build_unet(
            UNetConfig(**yaml.safe_load(open(ROOT / "configs/diffusion/ffhq.yaml"))["unet"]), 4, 32
        )
        batch, steps, setting = 16, 50, "ffhq.yaml UNet + ffhq_f8_cvq tokenizer, 256px"
    else:
        vqvae = VQTokenizer(
            resolution=16,
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(),
            z_channels=8,
            embed_dim=4,
            norm_groups=4,
            quantizer="cvq",
            quantizer_options={"num_codes": 16},
        )
        unet = build_unet(
            UNetConfig(
                block_out_channels=[16, 16],
                layers_per_block=1,
                attention_resolutions=[],
                attention_head_dim=8,
                norm_num_groups=4,
            ),
            4,
            8,
        )
        batch, steps, setting = 4, 5, "tiny random pipeline, 16px"
    vqvae, unet = vqvae.eval().to(device), unet.eval().to(device)
    setting = f"{setting}, batch {batch}, {steps} DDIM steps"
    ours = LatentDiffusionPipeline(vqvae=vqvae, unet=unet, scheduler=default_scheduler())
    ldm = LDMPipeline(vqvae=vqvae, unet=unet, scheduler=default_scheduler())
    variants = [
        ("ours (LatentDiffusionPipeline), fp32", ours, "fp32"),
        ("diffusers LDMPipeline, fp32", ldm, "fp32"),
    ]
    if device.type == "cuda":
        variants += [(f"ours (LatentDiffusionPipeline), {p}", ours, p) for p in ("bf16", "fp16")]
    rows = []
    for what, pipe, precision in variants:
        pipe.to(device, DTYPES[precision])  # the components are shared: cast back below
        pipe.set_progress_bar_config(disable=True)

        def step():
            pipe(
                batch_size=batch,
                num_inference_steps=steps,
                eta=0.0,
                generator=torch.Generator(device).manual_seed(0),
                output_type="np",
            )

        seconds, peak = measure(step, device, max(1, args.steps // 2), 1)
        pipe.to(device, torch.float32)
        rows.append(row("sampling", what, setting, seconds, peak, batch, "images/s"))
    return rows


def inception_weights(args) -> Path | None:
    """--inception-weights, else the torch hub cache (no download attempt), else with
    --random-inception a random-weights file in a temporary folder; None if none of these."""
    import os

    from engine.fid import INCEPTION_FILE, find_inception_weights
    from engine.weights import NO_DOWNLOAD

    if args.inception_weights:
        return Path(args.inception_weights)
    old = os.environ.get(NO_DOWNLOAD)
    os.environ[NO_DOWNLOAD] = "1"
    try:
        return find_inception_weights(None)
    except FileNotFoundError:
        pass
    finally:
        if old is None:
            del os.environ[NO_DOWNLOAD]
        else:
            os.environ[NO_DOWNLOAD] = old
    if not args.random_inception:
        return None
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(
            fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None
        ),
    ):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = Path(tempfile.mkdtemp()) / INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


def bench_inception(args, device) -> list[dict]:
    """Inception v3 (torch-fidelity's) 2048-d features of uint8 images, images/s."""
    from engine.fid import inception_features, load_inception

    batch, side = (64, 256) if args.size == "real" else (4, 32)
    setting = f"batch {batch}, {side}px -> 299px"
    path = inception_weights(args)
    if path is None:
        return [
            skipped(
                "inception",
                "Inception v3 features",
                setting,
                "skipped: no weights (--inception-weights PATH or --random-inception)",
            )
        ]
    model = load_inception(path, device)
    images = torch.rand(batch, 3, side, side, device=device) * 2 - 1
    seconds, peak = measure(
        lambda: inception_features(model, images), device, args.steps, args.warmup
    )
    notes = "random weights" if args.random_inception and not args.inception_weights else ""
    return [
        row("inception", "Inception v3 features", setting, seconds, peak, batch, "images/s", notes)
    ]


# ------------------------------------------------------------------------------------ output

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


def bench_data(args, device) -> list[dict]:
    """Listing an image folder (100,000 files in 1,000 class folders; tiny: 2,000 in 20) into a
    manifest, the first time and from the manifest, and encoding a latent cache at 256 px with
    flips (the real recipes' f8 tokenizer; tiny: 8 channels wide): one decode per image pair,
    loader workers, bf16 autocast."""
    import os

    from accelerate import Accelerator
    from PIL import Image

    from diffusion.latent_cache import build_latent_cache
    from engine.manifest import open_manifest
    from tokenizer import VQTokenizer

    files, classes = (100_000, 1000) if args.size == "real" else (2_000, 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images" / "train"
        for c in range(classes):
            (root / f"n{c:08d}").mkdir(parents=True)
            for i in range(files // classes):
                (root / f"n{c:08d}" / f"{i:06d}.JPEG").touch()  # names only: no decode
        cache = Path(tmp) / "manifests"
        for what in ("first listing", "manifest reused"):
            start = time.perf_counter()
            manifest = open_manifest(str(root), "folder", cache_dir=cache)
            seconds = time.perf_counter() - start
            rows.append(
                row(
                    "data",
                    f"image folder, {what}",
                    f"{len(manifest.table):,} files, {classes:,} classes",
                    seconds,
                    None,
                    files,
                    "files/s",
                )
            )
        images = Path(tmp) / "photos"
        images.mkdir()
        count = 17 if args.size == "tiny" else 65  # one image is held out
        generator = torch.Generator().manual_seed(0)
        for i in range(count):
            array = (torch.rand(288, 288, 3, generator=generator) * 255).byte().numpy()
            Image.fromarray(array).save(images / f"{i:05d}.jpg", quality=90)
        model = yaml.safe_load(open(ROOT / "configs/tokenizer/ffhq_f8_cvq.yaml"))["model"]
        if args.size == "tiny":
            model["ch"] = 8
        torch.manual_seed(0)
        tokenizer = VQTokenizer(**model)
        os.environ.setdefault("NEVERCOLLAPSE_DATA_CACHE", str(cache))
        for precision, workers in (("no", 0), ("bf16", 2)):
            accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
            start = time.perf_counter()
            build_latent_cache(
                tokenizer,
                {"source": str(images), "resolution": 256, "validation_size": 1},
                Path(tmp) / f"latents-{precision}",
                flips=True,
                batch_size=16,
                accelerator=accelerator,
                num_workers=workers,
            )
            seconds = time.perf_counter() - start
            accelerator.free_memory()
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            rows.append(
                row(
                    "data",
                    f"latent cache encoding, {precision}, {workers} workers",
                    f"{count - 1} images at 256 px, flips, ch {model['ch']}",
                    seconds,
                    None,
                    count - 1,
                    "images/s",
                    f"{2 * (count - 1) / seconds:,.1f} latents/s",
                )
            )
    return rows


BENCHMARKS = {
    "quantizer": bench_quantizer,
    "codebooks": bench_codebooks,
    "waits": bench_waits,
    "tokenizer": bench_tokenizer,
    "unet": bench_unet,
    "sampling": bench_sampling,
    "inception": bench_inception,
    "cache": bench_cache,
    "data": bench_data,
}


def table(rows: list[dict], device: torch.device, size: str) -> str:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=["tiny", "real"],
        default=None,
        help="default: real on CUDA, tiny elsewhere",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--only", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES)
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (default 10 real, 3 tiny; sampling uses half)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="default 3 real, 1 tiny")
    parser.add_argument(
        "--tokenizer-config",
        metavar="YAML",
        help="the tokenizer row's config (default: ffhq_f16_cvq.yaml real, digits_demo.yaml tiny)",
    )
    parser.add_argument(
        "--codebook-sizes",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[1024, 16384, 262144],
        help="codebooks family: the K to measure (default 1024,16384,262144)",
    )
    parser.add_argument(
        "--codebook-rows",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[2048, 65536],
        help="codebooks family: the N rows (multiples of 256) to measure (default 2048,65536)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    parser.add_argument("--inception-weights", metavar="PATH")
    parser.add_argument(
        "--random-inception",
        action="store_true",
        help="time Inception with random weights if no weights file is found",
    )
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting pipelines to bf16/fp16 warns every time
    device = torch.device(args.device)
    args.size = args.size or ("real" if device.type == "cuda" else "tiny")
    args.steps = args.steps or (10 if args.size == "real" else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.size == "real" else 1)
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(only) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {','.join(FAMILIES)}")
    rows = []
    for family in FAMILIES:
        if family in only:
            rows += BENCHMARKS[family](args, device)
    print(table(rows, device, args.size))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda"
                    else "cpu",
                    "torch": torch.__version__,
                    "size": args.size,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
