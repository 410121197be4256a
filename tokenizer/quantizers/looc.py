"""LooC: a low-dimensional codebook for compositional VQ (Li, Wong & Han, Sec. 3.2-3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import _check
from .cvq import ClusteredQuantizer

SEGMENT_LAYOUTS = ("channel", "unshuffle")
STRAIGHT_THROUGH = ("identity", "interpolated")


class LooCQuantizer(ClusteredQuantizer):
    """One shared codebook of K codes of dimension d* (``code_dim``) quantizes every d*-segment
    of the feature map (Sec. 3.2, "LDC"), so K codes express K^m vectors of m segments.
    Extrapolation-by-interpolation (Sec. 3.2): the B×C×H×W map is first up-sampled bilinearly
    by β (``interp_scale``, ``align_corners=False``), the segments of the up-sampled map are
    quantized, and the quantized map is average-pooled by β back to H×W. The CVQ running-average
    update (Eq. 4-6 of CVQ-VAE) keeps every code alive (Sec. 3.4).

    Options: those of ``ClusteredQuantizer`` plus
      interp_scale: β, an integer >= 1 (2 in the paper; 1 turns it off, Tab. 6).
      in_channels: C, optional; when given, the divisibility below is checked at construction
        instead of at the first call.
      segment_layout: which values of the up-sampled map form a segment.
        "channel" (default; the reading of the paper's Fig. 2): d* consecutive channels at one
          up-sampled position. Needs d* | C; m = C/d* segments per up-sampled position.
        "unshuffle" (the official code): the up-sampled map is pixel-unshuffled by β back to
          H×W (``F.pixel_unshuffle``: the β²·C-vector at (h, w) holds, at entry
          k = c·β² + p·β + q, channel c of up-sampled position (β·h + p, β·w + q)), and each
          β²·C-vector is cut into d* consecutive entries. Needs d* | β²·C. With β = 2 and d* = 4
          a segment is one channel's 2×2 up-sampled block; with d* = 2 one row of it.
        With β = 1 both layouts are the same.
      straight_through: the gradient of ``z_q`` to z (the value of ``z_q`` is the same).
        "identity" (default): dz = dz_q, as in VQ-VAE.
        "interpolated" (the official code, which applies the straight-through on the up-sampled
          map before pooling): the gradient of avgpool_β(upsample_β(z)), i.e.
          dz = upsample_βᵀ(avgpool_βᵀ(dz_q)). With β = 1 both are the identity.

    Index layout (``indices``, what ``decode_indices`` takes):
      "channel": shape B × βH × βW × m with m = C/d*; entry [b, i, j, s] is the code of
        channels s·d* … (s+1)·d* − 1 of up-sampled position (i, j).
      "unshuffle": shape B × H × W × M with M = β²·C/d*; entry [b, h, w, t] is the code of
        entries k = t·d* … (t+1)·d* − 1 of the pixel-unshuffled vector at (h, w), entry k being
        channel k // β² of up-sampled position (β·h + (k % β²) // β, β·w + k % β).
      Either way a latent position carries β²·C/d* indices (C/d* when β = 1). Flattened in
      C order, the indices are in the order the rows are searched (which matters for ties).

    Losses: the codebook and beta·commitment terms compare the up-sampled segments with their
    codes (where the quantization happens), in either straight-through mode.
    """

    def __init__(
        self,
        num_codes: int = 256,
        code_dim: int = 4,
        beta: float = 0.25,
        distance: str = "cosine",
        interp_scale: int = 2,
        in_channels: int | None = None,
        segment_layout: str = "channel",
        straight_through: str = "identity",
        **options,
    ):
        super().__init__(num_codes, code_dim, beta, distance, **options)
        _check(
            isinstance(interp_scale, int) and interp_scale >= 1,
            f"interp_scale (beta of LooC) must be an integer >= 1, got {interp_scale!r} "
            "(use 1 to turn extrapolation-by-interpolation off)",
        )
        _check(
            segment_layout in SEGMENT_LAYOUTS,
            f"segment_layout must be one of {SEGMENT_LAYOUTS} ('channel': d* consecutive "
            "channels per up-sampled position; 'unshuffle': the official code's "
            f"pixel-unshuffled layout), got {segment_layout!r}",
        )
        _check(
            straight_through in STRAIGHT_THROUGH,
            f"straight_through must be one of {STRAIGHT_THROUGH} ('identity': dz = dz_q; "
            "'interpolated': the official code's gradient through up-sampling and pooling), "
            f"got {straight_through!r}",
        )
        self.interp_scale = interp_scale
        self.segment_layout = segment_layout
        self.straight_through = straight_through
        self.in_channels = in_channels
        if in_channels is not None:
            self._check_channels(in_channels)

    def _check_channels(self, channels: int) -> None:
        d = self.code_dim
        if self.segment_layout == "channel":
            _check(
                channels % d == 0,
                f"LooC splits each feature vector into m = C/d* segments, but C={channels} is "
                f"not divisible by code_dim d*={d}; pick a d* that divides {channels} "
                f"or change the encoder's embed_dim to a multiple of {d}",
            )
            return
        s2 = self.interp_scale**2
        _check(
            channels * s2 % d == 0,
            f"with segment_layout='unshuffle' LooC splits each pixel-unshuffled vector of "
            f"β²·C values into d*-segments, but β²·C = {s2}·{channels} = {s2 * channels} "
            f"(C={channels}, β={self.interp_scale}) is not divisible by code_dim d*={d}; "
            f"pick a d* that divides {s2 * channels} or change the encoder's embed_dim",
        )

    def _segments_per_vector(self, channels: int) -> int:
        """Segments per row of the index layout: C/d* ("channel") or β²·C/d* ("unshuffle")."""
        if self.segment_layout == "unshuffle":
            return channels * self.interp_scale**2 // self.code_dim
        return channels // self.code_dim

    def _upsample(self, z: torch.Tensor) -> torch.Tensor:
        if self.interp_scale == 1:
            return z
        s = self.interp_scale
        return F.interpolate(z, scale_factor=s, mode="bilinear", align_corners=False)

    def _pool(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.interp_scale == 1 else F.avg_pool2d(z, self.interp_scale)

    def _to_rows(self, z: torch.Tensor) -> torch.Tensor:
        _check(z.dim() == 4, f"expected z of shape B×C×H×W, got shape {tuple(z.shape)}")
        self._check_channels(z.shape[1])
        z = self._upsample(z)
        if self.segment_layout == "unshuffle" and self.interp_scale > 1:
            z = F.pixel_unshuffle(z, self.interp_scale)  # B×β²C×H×W
        return z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)

    def _index_shape(self, z: torch.Tensor) -> tuple[int, ...]:
        b, c, h, w = z.shape
        m = self._segments_per_vector(c)
        if self.segment_layout == "unshuffle":
            return (b, h, w, m)
        s = self.interp_scale
        return (b, h * s, w * s, m)

    def _assemble(self, quantized_rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        b, hs, ws, m = indices.shape
        z = quantized_rows.view(b, hs, ws, m * self.code_dim).permute(0, 3, 1, 2)
        if self.segment_layout == "unshuffle" and self.interp_scale > 1:
            z = F.pixel_shuffle(z, self.interp_scale)  # B×β²C×H×W → B×C×βH×βW
        return self._pool(z).contiguous()

    def _straight_through(self, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """Value exactly ``z_hat`` (so ``decode_indices`` reproduces it bit for bit); gradient
        of the identity, or with "interpolated" that of g = avgpool(upsample(z)): the official
        z_up + sg(q_up − z_up) before pooling has gradient pool∘up too, because pooling is linear
        (and pixel (un)shuffling a permutation)."""
        if self.straight_through == "identity":
            return super()._straight_through(z, z_hat)
        g = self._pool(self._upsample(z))
        return z_hat.detach() + (g - g.detach())

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", interp_scale={self.interp_scale}, segment_layout={self.segment_layout!r}, "
            f"straight_through={self.straight_through!r}"
        )
