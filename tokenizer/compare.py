"""The quantizer comparison behind the README's first command: the same small VQ-VAE trained on
the same data with each quantizer, scored on held-out images."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metrics import CodebookUsage, psnr
from .quantizers import build_quantizer
from .vqvae import SmallVQVAE

# name → (kind, options); embed_dim 64 for all, so LooC's d*=4 gives m=16 segments.
DEFAULT_SETTINGS = {
    "VQ 256x64": ("vq", dict(num_codes=256, code_dim=64, distance="l2")),
    "CVQ 256x64": ("cvq", dict(num_codes=256, code_dim=64)),
    "LooC 64x4": ("looc", dict(num_codes=64, code_dim=4, interp_scale=2)),
}


@dataclass
class Result:
    name: str
    usage: float
    perplexity: float
    psnr: float
    seconds: float


def train_and_evaluate(name: str, kind: str, options: dict, data: dict[str, torch.Tensor],
                       steps: int = 300, batch_size: int = 128, lr: float = 1e-3,
                       hidden: int = 64, embed_dim: int = 64, seed: int = 0) -> Result:
    """Train for ``steps`` Adam steps on ``data["train"]`` with loss MSE/variance + quantizer
    loss (the papers' VQ-VAE objective), then measure on ``data["val"]``."""
    torch.manual_seed(seed)
    train, val = data["train"], data["val"]
    quantizer = build_quantizer(kind, **options)
    model = SmallVQVAE(quantizer, in_channels=train.shape[1], hidden=hidden,
                       residual_hidden=hidden // 4, embed_dim=embed_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    variance = train.var()
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (batch_size,))]
        recon, q = model(batch)
        loss = F.mse_loss(recon, batch) / variance + q.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start

    model.eval()
    meter = CodebookUsage(quantizer.num_codes)
    scores = []
    with torch.no_grad():
        for chunk in val.split(256):
            recon, q = model(chunk)
            meter.update(q.counts)
            scores.append(psnr(recon, chunk) * len(chunk))
    return Result(name, meter.usage, meter.perplexity, (sum(scores) / len(val)).item(), seconds)


def format_table(results: list[Result]) -> str:
    lines = ["| quantizer | usage | perplexity | PSNR (dB) | train time |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {100 * r.usage:.1f}% | {r.perplexity:.1f} | {r.psnr:.2f} "
                     f"| {r.seconds:.0f} s |")
    return "\n".join(lines)
