"""Reconstruction and codebook metrics."""

from __future__ import annotations

import torch

from .quantizers import perplexity


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB over the batch, images in [-1, 1] measured as [0, 1] pixels."""
    x = (reconstruction.clamp(-1, 1) + 1) / 2
    y = (target.clamp(-1, 1) + 1) / 2
    mse = (x - y).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (-10 * torch.log10(mse)).mean()


class CodebookUsage:
    """Accumulates code hits over an evaluation set: ``usage`` is the fraction of the K codes hit
    at least once, ``perplexity`` the exp-entropy of the pooled hit histogram."""

    def __init__(self, num_codes: int):
        self.counts = torch.zeros(num_codes, dtype=torch.long)

    def update(self, counts: torch.Tensor) -> None:
        self.counts += counts.detach().to(self.counts.device, torch.long)

    @property
    def usage(self) -> float:
        return (self.counts > 0).float().mean().item()

    @property
    def perplexity(self) -> float:
        return perplexity(self.counts).item()
