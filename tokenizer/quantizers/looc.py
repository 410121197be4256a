"""LooC: a low-dimensional codebook for compositional VQ (Li, Wong & Han, Sec. 3.2-3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import _check
from .cvq import ClusteredQuantizer


class LooCQuantizer(ClusteredQuantizer):
    """One shared codebook of K codes of dimension d* (``code_dim``) quantizes each of the
    m = C/d* contiguous segments of every C-channel feature vector (Sec. 3.2, "LDC"), so K codes
    express K^m vectors. Extrapolation-by-interpolation (Sec. 3.2): the B×C×H×W map is first
    up-sampled bilinearly by β (``interp_scale``), every segment of the βH×βW map is quantized,
    and the result is average-pooled by β back to H×W. The CVQ running-average update
    (Eq. 4-6 of CVQ-VAE) keeps every code alive (Sec. 3.4).

    Index layout: ``indices`` has shape B × βH × βW × m; entry [b, i, j, s] is the code of
    segment s (channels s·d* … (s+1)·d* − 1) of up-sampled position (i, j). A latent position
    therefore carries β²·m indices (m when β = 1).

    Losses: codebook and beta·commitment terms compare the up-sampled segments with their codes
    (where the quantization happens); ``z_q`` has the identity straight-through gradient to z.

    Options: those of ``ClusteredQuantizer`` plus
      interp_scale: β, an integer >= 1 (2 in the paper; 1 turns it off, Tab. 6).
      in_channels: C, optional; when given, C % d* is checked at construction instead of at the
        first call.
    """

    def __init__(
        self,
        num_codes: int = 256,
        code_dim: int = 4,
        beta: float = 0.25,
        distance: str = "cosine",
        interp_scale: int = 2,
        in_channels: int | None = None,
        **options,
    ):
        super().__init__(num_codes, code_dim, beta, distance, **options)
        _check(
            isinstance(interp_scale, int) and interp_scale >= 1,
            f"interp_scale (beta of LooC) must be an integer >= 1, got {interp_scale!r} "
            "(use 1 to turn extrapolation-by-interpolation off)",
        )
        self.interp_scale = interp_scale
        self.in_channels = in_channels
        if in_channels is not None:
            self._check_channels(in_channels)

    def _check_channels(self, channels: int) -> None:
        _check(
            channels % self.code_dim == 0,
            f"LooC splits each feature vector into m = C/d* segments, but C={channels} is not "
            f"divisible by code_dim d*={self.code_dim}; pick a d* that divides {channels} "
            f"or change the encoder's embed_dim to a multiple of {self.code_dim}",
        )

    def _to_rows(self, z: torch.Tensor) -> torch.Tensor:
        _check(z.dim() == 4, f"expected z of shape B×C×H×W, got shape {tuple(z.shape)}")
        self._check_channels(z.shape[1])
        if self.interp_scale > 1:
            z = F.interpolate(
                z, scale_factor=self.interp_scale, mode="bilinear", align_corners=False
            )
        return z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)

    def _index_shape(self, z: torch.Tensor) -> tuple[int, ...]:
        b, c, h, w = z.shape
        s = self.interp_scale
        return (b, h * s, w * s, c // self.code_dim)

    def _assemble(self, quantized_rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        b, hs, ws, m = indices.shape
        z = quantized_rows.view(b, hs, ws, m * self.code_dim).permute(0, 3, 1, 2)
        if self.interp_scale > 1:
            z = F.avg_pool2d(z, self.interp_scale)
        return z.contiguous()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", interp_scale={self.interp_scale}"
