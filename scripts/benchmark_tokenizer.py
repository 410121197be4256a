"""Training throughput of a tokenizer config: images/s of full generator + discriminator steps
on random images (no data loading), after warm-up.

    python scripts/benchmark_tokenizer.py --config configs/tokenizer/ffhq_f16_cvq.yaml \
        [--batch-size 8] [--precision bf16] [--steps 20] [--device cuda]
"""

import argparse
import time
import warnings

import torch
import yaml

from tokenizer.losses import VQGANLoss
from tokenizer.model import VQTokenizer
from tokenizer.train import parse_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe = parse_recipe(yaml.safe_load(open(args.config)))
    recipe.loss.disc_start = 0  # measure the full GAN step
    device = torch.device(args.device)
    model = VQTokenizer(**recipe.model).to(device).train()
    try:
        loss_fn = VQGANLoss(recipe.loss).to(device)
    except FileNotFoundError:  # no VGG16 weights here: time LPIPS with a random backbone
        loss_fn = VQGANLoss(recipe.loss, lpips_pretrained=False).to(device)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = (torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
             if loss_fn.discriminator is not None else None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    r, c = recipe.model.get("resolution", 256), recipe.model.get("in_channels", 3)
    x = torch.rand(args.batch_size, c, r, r, device=device) * 2 - 1

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32"):
            out = model(x)
            g, _ = loss_fn.generator_loss(x, out.sample, out.quantized.loss, model.last_layer, 0)
        g.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        if opt_d is not None:
            with torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32"):
                d, _ = loss_fn.discriminator_loss(x, out.sample.detach(), 0)
            d.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda"
            else "n/a")
    print("| config | device | batch | precision | step time | images/s | peak memory |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.config} | {device.type} | {args.batch_size} | {args.precision} "
          f"| {seconds * 1000:.0f} ms | {args.batch_size / seconds:.1f} | {peak} |")


if __name__ == "__main__":
    main()
