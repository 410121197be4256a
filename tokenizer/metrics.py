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
    def dead(self) -> int:
        """Codes never hit."""
        return int((self.counts == 0).sum())

    @property
    def perplexity(self) -> float:
        return perplexity(self.counts).item()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return g[:, None] * g[None, :]


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03,
    no padding), images in [-1, 1] measured as [0, 1] pixels, averaged over channels.
    Returns a tensor of length B."""
    x = ((reconstruction.clamp(-1, 1) + 1) / 2).double()
    y = ((target.clamp(-1, 1) + 1) / 2).double()
    c = x.shape[1]
    size = min(11, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size).to(x.device).expand(c, 1, size, size)

    def blur(t):
        return torch.nn.functional.conv2d(t, window, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()
