"""The ``tokenizer`` family: images/s of a full tokenizer training step (generator and
discriminator) of a stage-one recipe on random images."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import yaml

from benchmarks.common import DTYPES, ROOT, measure, row


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
