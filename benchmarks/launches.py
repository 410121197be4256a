"""The ``launches`` family: what the CPU can prove about a GPU step. For each recipe's quantizer
setting, at its real size per GPU, the tiles per search with the GPU's tile budget and the
operators launched by a forward + backward (counted on PyTorch's meta device, which runs the
code path of an accelerator without computing anything: the sync-free search, the GPU budget),
with the PyTorch search and with the fused Triton kernels; and for one whole training step of
each stage's ImageNet recipe (on the CPU, at a miniature resolution: the count depends on the
layers, not on the size) the operators launched and the reads of device values."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import ROOT, measure, row, skipped
from tokenizer.quantizers.search import DEVICE_SEARCH_BYTES

# (what, kind, options, latents per GPU): the settings of the GPU performance issue's table
SETTINGS = [
    (
        "LooC, FFHQ f16 (the paper's)",
        "looc",
        dict(num_codes=1024, code_dim=4, interp_scale=2),
        (32, 256, 16, 16),
        "target <= 64 tiles, <= 500 launches (PyTorch path)",
    ),
    (
        "LooC, FFHQ f16, closest anchors",
        "looc",
        dict(num_codes=1024, code_dim=4, interp_scale=2, anchor="closest"),
        (32, 256, 16, 16),
        "",
    ),
    (
        "CVQ, ImageNet f8, batch 8",
        "cvq",
        dict(num_codes=16384, code_dim=4, anchor="closest"),
        (8, 4, 32, 32),
        "target <= 64 tiles",
    ),
    (
        "SimVQ, 262,144 codes",
        "simvq",
        dict(num_codes=262144, code_dim=128),
        (32, 128, 16, 16),
        "target <= 64 tiles",
    ),
    (
        "IBQ, 262,144 codes",
        "ibq",
        dict(num_codes=262144, code_dim=256),
        (32, 256, 16, 16),
        "target <= 64 tiles",
    ),
    ("LFQ, 2^18 codes", "lfq", dict(code_dim=18), (32, 18, 16, 16), ""),
    ("FSQ, 64,000 codes", "fsq", dict(levels=[8, 8, 8, 5, 5, 5]), (32, 6, 16, 16), ""),
]


class CountOps(TorchDispatchMode):
    """Operators that launch work (views are not launches), and Triton kernel launches added
    by :class:`_Launches`."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


class _Launches:
    """A stand-in for a Triton kernel on the meta device: ``kernel[grid](...)`` counts one
    launch and leaves its outputs as they are."""

    def __init__(self, counter: CountOps):
        self.counter = counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.count += 1

        return launch


def quantizer_launches(kind: str, options: dict, shape, triton: bool) -> tuple[int, int | None]:
    """(operators launched by a training forward + backward on the meta device, tiles per
    search or None)."""
    from tokenizer.quantizers import build_quantizer, search
    from tokenizer.quantizers.search import search_budget, tiles_per_search

    with torch.device("meta"):
        budget = (
            {} if kind == "fsq" else {"max_search_bytes": DEVICE_SEARCH_BYTES}
        )  # FSQ: no search
        q = build_quantizer(kind, **budget, **options).train()
        z = torch.randn(*shape, requires_grad=True)
    rows = shape[0] * shape[2] * shape[3]
    if kind == "looc":  # β² up-sampled positions, C / d* segments each
        rows *= options["interp_scale"] ** 2 * shape[1] // options["code_dim"]
    k = getattr(q, "num_codes", None)
    elements = search_budget(torch.device("cuda"), DEVICE_SEARCH_BYTES)
    tiles = tiles_per_search(rows, k, elements) if kind not in ("fsq",) else None
    if kind == "lfq":  # the batch entropy's tiles: groups of at most 14 bits
        tiles = sum(tiles_per_search(rows, 2 ** (b - a), elements) for a, b in q.groups)
    counter = CountOps()
    patches = [mock.patch.object(torch, "autocast", lambda *a, **k: contextlib.nullcontext())]
    if triton:
        kernels = search.triton_kernels()
        if kernels is None:
            return -1, tiles
        patches += [
            mock.patch.object(search, "use_triton", lambda x: True),
            mock.patch.object(kernels, "_nearest", _Launches(counter)),
            mock.patch.object(kernels, "_anchor", _Launches(counter)),
        ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        with counter:
            out = q(z)
            (out.z_q.float().pow(2).mean() + out.loss).backward()
    return counter.count, tiles


def step_launches(stage: str) -> tuple[int, int]:
    """(operators, device reads) of one training step of the stage's ImageNet recipe on the
    CPU at a miniature resolution: the tokenizer's full GAN step, the UNet's denoising step."""
    import warnings

    import yaml

    from engine.waits import CountWaits

    counter = CountOps()
    if stage == "tokenizer":
        from engine.config import from_mapping
        from tokenizer.losses import VQGANLoss
        from tokenizer.model import VQTokenizer
        from tokenizer.train import TokenizerConfig

        data = yaml.safe_load(open(ROOT / "configs/tokenizer/imagenet_f16_looc.yaml"))
        data["model"].update(resolution=32, ch=32)  # the layers of the recipe, small
        data["data"]["resolution"] = 32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recipe = from_mapping(TokenizerConfig, data)
        model = VQTokenizer(**recipe.model).train()
        loss_fn = VQGANLoss(recipe.loss, lpips_pretrained=False)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)  # as on a GPU
        x = torch.rand(2, 3, 32, 32) * 2 - 1

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                g, _ = loss_fn.generator_loss(
                    x, out.sample, out.quantized.loss, model.last_layer, 0
                )
            g.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from diffusion.unet import UNetConfig, build_unet, training_scheduler
        from engine.config import from_mapping

        unet_section = yaml.safe_load(open(ROOT / "configs/diffusion/imagenet_cin.yaml"))["unet"]
        # the recipe's layers, narrow (the count depends on the layers, not their width; the
        # widths keep their ratios, so the same blocks change width and need a shortcut)
        width = math.lcm(unet_section["norm_num_groups"], unet_section["attention_head_dim"])
        first = unet_section["block_out_channels"][0]
        unet_section["block_out_channels"] = [
            width * round(c / first) for c in unet_section["block_out_channels"]
        ]
        unet = build_unet(from_mapping(UNetConfig, unet_section, "unet"), 4, 32).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=True)  # as on a GPU
        schedule = training_scheduler()
        latents = torch.randn(2, 4, 32, 32)

        def step():
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (2,))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = unet(schedule.add_noise(latents, noise, t), t, class_labels=t % 1000).sample
            torch.nn.functional.mse_loss(pred.float(), noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # the optimizer's state is made in the first step
    with counter, CountWaits() as waits:
        step()
    reads, _ = waits.take()
    host = "torch/optim/optimizer.py:_get_value"  # Adam's step counters live on the host
    return counter.count, sum(n for place, n in reads.items() if host not in place)


def bench_launches(args, device) -> list[dict]:
    """Rows without a time: the counts are in ``count`` and the notes (the same on any machine)."""
    rows = []
    for what, kind, options, shape, target in SETTINGS:
        ops, tiles = quantizer_launches(kind, options, shape, triton=False)
        fused, _ = quantizer_launches(kind, options, shape, triton=True)
        setting = (
            ", ".join(f"{k}={v}" for k, v in options.items()) + f", {'x'.join(map(str, shape))}"
        )
        notes = f"{ops} launches (PyTorch path)"
        if kind in ("vq", "cvq", "looc", "simvq"):
            notes += (
                f", {fused} with the Triton kernels" if fused >= 0 else ", Triton not installed"
            )
        if tiles is not None:
            notes = f"{tiles} tiles per search of {DEVICE_SEARCH_BYTES // 2**20} MiB; " + notes
        if target:
            notes += f"; {target}"
        rows.append(
            {**skipped("launches", f"quantizer fwd+bwd: {what}", setting, notes), "count": ops}
        )
    if device.type == "cuda":  # the times and memory the counts stand for
        rows += quantizer_times(args, device)
    for stage, recipe in (("tokenizer", "imagenet_f16_looc"), ("unet", "imagenet_cin")):
        ops, reads = step_launches("tokenizer" if stage == "tokenizer" else "diffusion")
        setting = f"configs/*/{recipe}.yaml's layers, bf16, batch 2 at 32 px (CPU)"
        notes = f"{ops} launches, {reads} device read(s) in the step"
        rows.append({**skipped("launches", f"{stage} training step", setting, notes), "count": ops})
    return rows


def quantizer_times(args, device) -> list[dict]:
    """On a GPU, each setting's forward + backward with the Triton kernels, the PyTorch tiles
    and the dense formulation (one tile: the whole N×K matrix), time and peak memory; a setting
    whose dense matrix does not fit says so."""
    from tokenizer.quantizers import build_quantizer, search

    rows = []
    for what, kind, options, shape, _ in SETTINGS:
        for path, max_bytes, triton in (
            ("Triton kernels", None, True),
            ("PyTorch tiles", None, False),
            ("dense", 2**62, False),
        ):
            if triton and kind not in ("vq", "cvq", "looc", "simvq"):
                continue
            budget = {} if kind == "fsq" else {"max_search_bytes": max_bytes}
            torch.manual_seed(0)
            q = build_quantizer(kind, **budget, **options).to(device).train()
            z = torch.randn(*shape, device=device, requires_grad=True)

            def step():
                out = q(z)
                (out.z_q.float().pow(2).mean() + out.loss).backward()

            setting = "x".join(map(str, shape))
            try:
                with mock.patch.object(search, "use_triton", lambda x, t=triton: t):
                    seconds, peak = measure(step, device, args.steps, args.warmup)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(skipped("launches", f"{what}: {path}", setting, "out of memory"))
                continue
            rows.append(
                row(
                    "launches",
                    f"{what}: {path}",
                    setting,
                    seconds,
                    peak,
                    math.prod(shape),
                    "values/s",
                )
            )
            if kind in ("fsq",):
                break
    return rows
