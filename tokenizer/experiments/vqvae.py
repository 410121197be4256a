"""The small VQ-VAE of the papers' low-resolution tables (CVQ-VAE Tab. 1, LooC Tab. 1): two
stride-2 convolutions, a residual stack, a 1×1 projection to the code dimension, and the mirror
image as decoder. Used by the quantizer comparison and the table reproductions."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..quantizers import QuantizerOutput


class _Residual(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x):
        return x + self.block(x)


def _residual_stack(channels: int, hidden: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[_Residual(channels, hidden) for _ in range(layers)], nn.ReLU())


class SmallVQVAE(nn.Module):
    """Image (B×in_channels×H×W, H and W divisible by 4) → latents (B×embed_dim×H/4×W/4) →
    ``quantizer`` → image."""

    def __init__(
        self,
        quantizer: nn.Module,
        in_channels: int = 1,
        hidden: int = 128,
        residual_layers: int = 2,
        residual_hidden: int = 32,
        embed_dim: int = 64,
    ):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            _residual_stack(hidden, residual_hidden, residual_layers),
            nn.Conv2d(hidden, embed_dim, 1),
        )
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv2d(embed_dim, hidden, 3, padding=1),
            _residual_stack(hidden, residual_hidden, residual_layers),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, in_channels, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.z_q), q
