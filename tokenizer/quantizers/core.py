"""What every quantizer shares: the output, the contract (:class:`Quantizer`), and for those with
an explicit K×d codebook (:class:`CodebookQuantizer`) the search, the losses and the
straight-through estimator, all computed in float32 whatever autocast says."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .search import DISTANCES, nearest_code


@dataclass
class QuantizerOutput:
    """``z_q``: quantized B×C×H×W in the input dtype, with a straight-through gradient to ``z``.
    ``loss``: the quantizer's whole loss (codebook + beta·commitment, plus the kind's own terms),
    a float32 scalar. ``indices``: long codes (layout per quantizer). ``counts``: hits per code in
    this batch on this process (length K). ``perplexity``: exp of the entropy of ``counts``."""

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    perplexity: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(−Σ p log p) with p = counts / Σ counts (CVQ-VAE Sec. 4.1)."""
    p = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum())


def straight_through(z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """Value of ``z_hat``, gradient of the identity to ``z``. Written as z_hat + (z − sg[z]) rather
    than z + sg[z_hat − z] so that the value is exactly ``z_hat`` (no rounding), which is what
    lets ``decode_indices`` reproduce ``z_q`` bit for bit."""
    return z_hat.detach() + (z - z.detach())


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class Quantizer(nn.Module):
    """The contract of every quantizer: ``forward(z)`` on B×C×H×W (any dtype, inside autocast or
    not) → :class:`QuantizerOutput`, and ``decode_indices(indices)`` → the same ``z_q`` bit for
    bit. ``num_codes`` (K, the length of ``counts``) and ``code_dim`` are set by subclasses.
    This base holds the layout of one code per spatial position and the counting."""

    num_codes: int
    code_dim: int

    def _to_rows(self, z: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → (B·H·W)×C."""
        _check(z.dim() == 4, f"expected z of shape B×C×H×W, got shape {tuple(z.shape)}")
        _check(
            z.shape[1] == self.code_dim,
            f"z has C={z.shape[1]} channels but code_dim={self.code_dim}; set code_dim to "
            "the encoder's embed_dim",
        )
        return z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)

    def _index_shape(self, z: torch.Tensor) -> tuple[int, ...]:
        """B×H×W: one index per spatial position."""
        b, _, h, w = z.shape
        return (b, h, w)

    def _assemble(self, quantized_rows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows of code vectors (index layout) → B×C×H×W."""
        b, h, w = indices.shape
        return quantized_rows.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()

    def _counts(self, flat_indices: torch.Tensor) -> torch.Tensor:
        """Hits per code (K). index_add_, not bincount: bincount waits for the host on CUDA to
        size its output."""
        counts = torch.zeros(self.num_codes, dtype=torch.long, device=flat_indices.device)
        return counts.index_add_(0, flat_indices, torch.ones_like(flat_indices))

    def _output(self, z_q, loss, flat_indices, z, codebook_loss, commitment_loss):
        counts = self._counts(flat_indices)
        return QuantizerOutput(
            z_q=z_q,
            loss=loss,
            indices=flat_indices.view(self._index_shape(z)),
            counts=counts,
            perplexity=perplexity(counts),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CodebookQuantizer(Quantizer):
    """Quantizers with an explicit K×d codebook searched by ``distance``.

    Subclasses choose the codebook (``codes``, ``_initial_codebook``), how B×C×H×W maps to rows
    of dimension d and back (``_to_rows``, ``_index_shape``, ``_assemble``) and what happens to
    the codebook after each training step (``_update_codebook``).
    """

    distances = DISTANCES
    trainable_codebook = True  # a parameter; False: a buffer (SimVQ's frozen codebook)

    def __init__(
        self,
        num_codes: int = 1024,
        code_dim: int = 64,
        beta: float = 0.25,
        distance: str = "l2",
        max_search_bytes: int | None = None,
    ):
        super().__init__()
        _check(
            isinstance(num_codes, int) and num_codes >= 1,
            f"num_codes (K) must be an integer >= 1, got {num_codes!r}",
        )
        _check(
            isinstance(code_dim, int) and code_dim >= 1,
            f"code_dim must be an integer >= 1, got {code_dim!r}",
        )
        _check(beta >= 0, f"beta (commitment weight) must be >= 0, got {beta!r}")
        _check(
            distance in self.distances,
            f"distance must be one of {self.distances}, got {distance!r}",
        )
        _check(
            max_search_bytes is None or max_search_bytes >= 4,
            f"max_search_bytes must be >= 4 (one score) or None, got {max_search_bytes!r}",
        )
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.distance = distance
        self.max_search_bytes = max_search_bytes
        initial = self._initial_codebook(num_codes, code_dim)
        if self.trainable_codebook:
            self.codebook = nn.Parameter(initial)
        else:
            self.register_buffer("codebook", initial)

    def _initial_codebook(self, num_codes: int, code_dim: int) -> torch.Tensor:
        # VQ-VAE's initialisation, U(−1/K, 1/K), as in the papers' code: far from the data,
        # which is what makes plain VQ collapse and what CVQ repairs.
        return torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)

    def codes(self) -> torch.Tensor:
        """The K×d codes in float32, with their gradient (the codebook itself here)."""
        return self.codebook.float()

    # --- training-time hooks ------------------------------------------------------------------
    def _codebook_loss(self, rows: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """‖sg[z] − e‖² (Eq. 3, second term): moves the codebook toward the features."""
        return F.mse_loss(quantized, rows.detach())

    def _update_codebook(
        self, rows: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor | None:
        """Non-gradient codebook update after a training step; may return an extra loss."""
        return None

    def _straight_through(self, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """``z_q`` from the input and the assembled codes: value ``z_hat``, gradient to ``z``."""
        return straight_through(z, z_hat)

    # --- public API ---------------------------------------------------------------------------
    def search(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Each row's nearest code among ``codes`` (float32, no gradient)."""
        return nearest_code(rows, codes, self.distance, self.max_search_bytes)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            rows = self._to_rows(zf)
            codes = self.codes()
            flat_indices = self.search(rows, codes.detach())
            quantized = F.embedding(flat_indices, codes)
            codebook_loss = self._codebook_loss(rows, quantized)
            commitment_loss = F.mse_loss(rows, quantized.detach())
            loss = codebook_loss + self.beta * commitment_loss
            counts = self._counts(flat_indices)
            if self.training:
                extra = self._update_codebook(rows.detach(), flat_indices, counts)
                if extra is not None:
                    loss = loss + extra
            indices = flat_indices.view(self._index_shape(zf))
            z_hat = self._assemble(quantized, indices)
            z_q = self._straight_through(zf, z_hat).to(in_dtype)
        return QuantizerOutput(
            z_q=z_q,
            loss=loss,
            indices=indices,
            counts=counts,
            perplexity=perplexity(counts),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (the layout ``forward`` returns) → z_q, float32, bit-identical to ``forward``'s
        ``z_q`` for the same codebook."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            quantized = F.embedding(indices.reshape(-1), self.codes())
        return self._assemble(quantized, indices)

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, "
            f"distance={self.distance!r}"
        )
