"""The ``unet`` family: latents/s of a UNet training step (epsilon-prediction MSE, AdamW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import yaml

from benchmarks.common import DTYPES, ROOT, measure, row


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
