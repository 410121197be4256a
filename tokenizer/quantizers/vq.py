"""The VQ-VAE baseline (van den Oord et al. 2017; CVQ-VAE Eq. 2-3)."""

from __future__ import annotations

import torch

from .core import CodebookQuantizer, _check
from .distributed import all_reduce_sum


class VectorQuantizer(CodebookQuantizer):
    """Plain VQ: nearest code, straight-through gradient, loss
    ‖sg[z] − e‖² + beta·‖z − sg[e]‖² (Eq. 3).

    Options (besides the common ``num_codes``, ``code_dim``, ``beta``, ``distance``):
      ema: if true, the codebook is not learned by the codebook loss but by exponential moving
        averages of the assigned features (VQ-VAE-2, Razavi et al. 2019; Oord et al. 2017 App. A):
        N_k ← γN_k + (1−γ)n_k, m_k ← γm_k + (1−γ)Σ z, e_k = m_k / N_k (Laplace-smoothed).
        The loss is then beta·commitment only. Counts and sums are reduced across processes.
      ema_decay: γ for the EMA (0.99).
      ema_epsilon: Laplace smoothing constant (1e-5).
    """

    def __init__(
        self,
        num_codes: int = 1024,
        code_dim: int = 64,
        beta: float = 0.25,
        distance: str = "l2",
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        **common,
    ):
        super().__init__(num_codes, code_dim, beta, distance, **common)
        _check(0 < ema_decay < 1, f"ema_decay must be in (0, 1), got {ema_decay!r}")
        self.ema = ema
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        if ema:
            self.codebook.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(num_codes))
            self.register_buffer("ema_embed_sum", self.codebook.detach().clone())

    def _codebook_loss(self, rows, quantized):
        if self.ema:
            return rows.new_zeros(())
        return super()._codebook_loss(rows, quantized)

    @torch.no_grad()
    def _update_codebook(self, rows, indices, counts):
        if not self.ema:
            return None
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, rows)
        counts = all_reduce_sum(counts.float())
        sums = all_reduce_sum(sums)
        self.ema_cluster_size.lerp_(counts, 1 - self.ema_decay)
        self.ema_embed_sum.lerp_(sums, 1 - self.ema_decay)
        total = self.ema_cluster_size.sum()
        smoothed = (
            (self.ema_cluster_size + self.ema_epsilon)
            / (total + self.num_codes * self.ema_epsilon)
            * total
        )
        self.codebook.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))
        return None

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", ema=True, ema_decay={self.ema_decay}" if self.ema else ""
        )
