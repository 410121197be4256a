"""The quantizer comparison behind the README's first command: the same small VQ-VAE trained on
the same data with each quantizer, scored on held-out images. ``train`` and ``evaluate`` are
also the loop of the table reproductions (``tokenizer.experiments.reproduce``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..metrics import CodebookUsage, psnr, ssim
from ..quantizers import build_quantizer
from .vqvae import SmallVQVAE

# name → (kind, options) at about 256 codes; latents of 64 channels (LooC's d*=4: m=16
# segments), except FSQ's and LFQ's, which take one channel per level or bit.
DEFAULT_SETTINGS = {
    "VQ 256x64": ("vq", dict(num_codes=256, code_dim=64, distance="l2")),
    "CVQ 256x64": ("cvq", dict(num_codes=256, code_dim=64)),
    "LooC 64x4": ("looc", dict(num_codes=64, code_dim=4, interp_scale=2)),
    "FSQ [8, 6, 5]": ("fsq", dict(levels=[8, 6, 5])),
    "LFQ 2^8": ("lfq", dict(code_dim=8)),
    "SimVQ 256x64": ("simvq", dict(num_codes=256, code_dim=64)),
    "IBQ 256x64": ("ibq", dict(num_codes=256, code_dim=64)),
}


def latent_channels(kind: str, options: dict, default: int) -> int:
    """The latent channels a quantizer takes: one per level (FSQ), the code dimension of the
    others (LFQ: one per bit), ``default`` for LooC (split into d*-segments)."""
    if kind == "looc":
        return default
    return len(options["levels"]) if kind == "fsq" else options["code_dim"]


@dataclass
class Result:
    name: str
    usage: float
    perplexity: float
    psnr: float
    seconds: float


def build_model(
    kind: str, options: dict, in_channels: int = 1, hidden: int = 64, embed_dim: int = 64
) -> SmallVQVAE:
    """The small VQ-VAE (residual hidden = hidden / 4, as 128 → 32 in the papers' code)."""
    return SmallVQVAE(
        build_quantizer(kind, **options),
        in_channels=in_channels,
        hidden=hidden,
        residual_hidden=hidden // 4,
        embed_dim=embed_dim,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vqvae_loss(
    recon: torch.Tensor, images: torch.Tensor, quantizer_loss: torch.Tensor, variance
) -> torch.Tensor:
    """The papers' VQ-VAE objective: MSE(recon, images) / ``variance`` + quantizer loss."""
    return F.mse_loss(recon, images) / variance + quantizer_loss


def train(
    model: SmallVQVAE,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    every: int = 0,
    callback: Callable[[int], None] | None = None,
    variance: float | torch.Tensor | None = None,
) -> float:
    """``steps`` Adam steps on random batches of ``images`` (drawn with the global CPU RNG, so
    the batches do not depend on the device) with :func:`vqvae_loss`, the MSE divided by
    ``variance`` (default: the variance of ``images``, on the MSE's own scale). Calls
    ``callback(step)`` every ``every`` steps (its time is not counted). Returns the training
    seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    variance = images.var() if variance is None else variance
    seconds = 0.0
    model.train()
    for step in range(1, steps + 1):
        start = time.perf_counter()
        batch = images[torch.randint(0, len(images), (batch_size,)).to(images.device)]
        recon, q = model(batch)
        loss = vqvae_loss(recon, batch, q.loss, variance)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _synchronize(images.device)
        seconds += time.perf_counter() - start
        if callback is not None and every and step % every == 0:
            callback(step)
            model.train()
    return seconds


@torch.no_grad()
def evaluate(
    model: SmallVQVAE, images: torch.Tensor, chunk: int = 250
) -> tuple[dict[str, float], torch.Tensor]:
    """In eval mode: codebook usage and perplexity of the code counts accumulated over all of
    ``images`` (as the official test.py), the MSE of the unclamped output (the official
    validation loss, here on [0, 1] pixels), and mean PSNR / SSIM / L1 (on [0, 1] pixels).
    Returns the metrics and the reconstructions (on the CPU)."""
    model.eval()
    meter = CodebookUsage(model.quantizer.num_codes)
    recons, squared = [], 0.0
    for part in images.split(chunk):
        recon, q = model(part)
        meter.update(q.counts)
        squared += F.mse_loss(recon.float(), part.float(), reduction="sum").item() / 4
        recons.append(recon.clamp(-1, 1).float().cpu())
    recon, target = torch.cat(recons), images.float().cpu()
    scores = {
        "usage": meter.usage,
        "dead_codes": meter.dead,
        "perplexity": meter.perplexity,
        "mse": squared / max(1, images.numel()),
        "psnr": sum(
            psnr(r, t) * len(r) for r, t in zip(recon.split(chunk), target.split(chunk))
        ).item()
        / len(target),
        "ssim": ssim(recon, target).mean().item(),
        "l1": ((recon - target.clamp(-1, 1)).abs() / 2).mean().item(),
    }
    return scores, recon


def train_and_evaluate(
    name: str,
    kind: str,
    options: dict,
    data: dict[str, torch.Tensor],
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    hidden: int = 64,
    embed_dim: int = 64,
    seed: int = 0,
) -> Result:
    """Train for ``steps`` Adam steps on ``data["train"]`` with loss MSE/variance + quantizer
    loss (the papers' VQ-VAE objective), then measure on ``data["val"]``."""
    torch.manual_seed(seed)
    channels = latent_channels(kind, options, embed_dim)
    model = build_model(kind, options, data["train"].shape[1], hidden, channels)
    seconds = train(model, data["train"], steps, batch_size, lr)
    scores, _ = evaluate(model, data["val"])
    return Result(name, scores["usage"], scores["perplexity"], scores["psnr"], seconds)


def format_table(results: list[Result]) -> str:
    lines = ["| quantizer | usage | perplexity | PSNR (dB) | train time |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.name} | {100 * r.usage:.1f}% | {r.perplexity:.1f} | {r.psnr:.2f} "
            f"| {r.seconds:.0f} s |"
        )
    return "\n".join(lines)
