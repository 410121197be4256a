"""Tokenizer evaluation: rFID, PSNR, SSIM, LPIPS, codebook usage and perplexity over a dataset."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from engine.fid import frechet_distance, inception_features

from .metrics import CodebookUsage, psnr, ssim
from .model import VQTokenizer


@torch.no_grad()
def evaluate_tokenizer(
    model: VQTokenizer,
    dataset: Dataset,
    batch_size: int = 32,
    lpips: torch.nn.Module | None = None,
    inception: torch.nn.Module | None = None,
    max_images: int | None = None,
    num_workers: int = 0,
) -> dict:
    """Reconstruct ``dataset`` (items with ``pixel_values`` in [-1, 1]) and return a dict with
    ``images``, ``psnr`` and ``ssim`` (means), ``l1``, ``usage`` (fraction of codes hit at least
    once over the whole set), ``perplexity`` (of the pooled code histogram), and ``lpips`` /
    ``rfid`` when those networks are given (else ``None``)."""
    model.eval()
    device = model.device
    usage = CodebookUsage(model.vector_quantizer.num_codes)
    sums = {"psnr": 0.0, "ssim": 0.0, "l1": 0.0, "lpips": 0.0}
    real, fake, n = [], [], 0
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        x = batch["pixel_values"].to(device)
        if max_images is not None:
            x = x[: max_images - n]
        if len(x) == 0:
            break
        out = model(x)
        recon = out.sample.float().clamp(-1, 1)
        usage.update(out.quantized.counts.cpu())
        sums["psnr"] += psnr(recon, x).item() * len(x)
        sums["ssim"] += ssim(recon, x).sum().item()
        sums["l1"] += ((recon - x).abs().flatten(1).mean(1) / 2).sum().item()  # [0, 1] pixels
        if lpips is not None:
            sums["lpips"] += lpips(recon, x).sum().item()
        if inception is not None:
            real.append(inception_features(inception, x)["2048"])
            fake.append(inception_features(inception, recon)["2048"])
        n += len(x)
        if max_images is not None and n >= max_images:
            break
    if n == 0:
        raise ValueError("the evaluation set is empty")
    report = {k: v / n for k, v in sums.items()}
    report.update(
        images=n, usage=usage.usage, perplexity=usage.perplexity, num_codes=usage.counts.numel()
    )
    report["lpips"] = report["lpips"] if lpips is not None else None
    report["rfid"] = (
        frechet_distance(torch.cat(real), torch.cat(fake)) if inception is not None else None
    )
    return report
