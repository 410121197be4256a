"""The ``sampling`` family: images/s of our LatentDiffusionPipeline against diffusers'
LDMPipeline on the same components."""

from __future__ import annotations

import torch
import yaml

from benchmarks.common import DTYPES, ROOT, measure, row, tiny_tokenizer_model


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
        vqvae = VQTokenizer(**tiny_tokenizer_model())  # configs/tokenizer/tiny.yaml
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
