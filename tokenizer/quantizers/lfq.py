"""LFQ: lookup-free quantization (Yu et al., "Language Model Beats Diffusion: Tokenizer is Key to
Visual Generation" (MAGVIT-v2), ICLR 2024, Sec. 3.1; the weights of Open-MAGVIT2's configs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import Quantizer, QuantizerOutput, _check, straight_through
from .distributed import all_reduce_sum, world_size
from .softmax import CodeSoftmax, softmax_stats

# K = 2^d codes are counted per batch (``counts``): d is bounded so that this stays small
MAX_BITS = 24


def bit_groups(bits: int, group_bits: int) -> list[tuple[int, int]]:
    """[start, stop) of the channels of each group: ⌈bits / group_bits⌉ groups, sizes as equal as
    possible (18 bits in groups of at most 14: 9 + 9)."""
    count = math.ceil(bits / group_bits)
    sizes = [bits // count + (i < bits % count) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return [(s, s + size) for s, size in zip(starts, sizes)]


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of Bernoulli(sigmoid(logits)), elementwise, in a form without cancellation:
    softplus(−|a|) + |a|·sigmoid(−|a|)."""
    a = logits.abs()
    return F.softplus(-a) + a * torch.sigmoid(-a)


class LFQQuantizer(Quantizer):
    """Each of the d channels is quantized to its sign, ±1 (0 → −1), so the implicit codebook
    is {−1, 1}^d with K = 2^d codes and nothing to look up; z_q has the identity gradient to z.

    Loss (Sec. 3.1): beta·‖z − sg[q]‖² (commitment) + entropy_weight·(sample_entropy_weight·
    E_n[H(p_n)] − batch_entropy_weight·H(E_n[p_n])), where p_n(c) = softmax_c(2 z_n·c / τ) is
    the soft assignment of row n to the codes (the softmax of −‖z_n − c‖² / τ): a confident
    assignment per row, an even use of the codebook over the batch. The batch is that of all
    processes (one all-reduce per training forward). Without forming N×K:
      - p_n factorises over the bits (p_n(c) = Π_i sigmoid(4 z_ni c_i / τ)), so the per-row
        entropy is exactly the sum of d binary entropies;
      - the batch mean does not factorise: its entropy is computed exactly over all 2^d codes
        in tiles when d <= ``entropy_group_bits``, else as the sum of the entropies of the
        groups of bits (⌈d / entropy_group_bits⌉ groups of nearly equal size, 9 + 9 at 2^18),
        an upper bound of the joint entropy with the same maximum d·log 2. MAGVIT-v2's authors
        estimate it "globally or over sub-groups" (vector-quantize-pytorch issue 78);
        Open-MAGVIT2 forms the whole N × 2^18 matrix.
    The entropy terms are computed in training mode only. No codebook loss (``codebook_loss``
    is 0).

    Options (defaults: MAGVIT-v2 / Open-MAGVIT2's ImageNet configs):
      code_dim: d, the input's channels (the tokenizer's embed_dim); K = 2^d, d <= 24.
      beta: commitment weight (0.25).
      entropy_weight: weight of the entropy penalty (0.1).
      entropy_temperature: τ (0.01).
      sample_entropy_weight, batch_entropy_weight: the weights of the two entropies (1, 1).
      entropy_group_bits: the most bits whose 2^bits codes the batch entropy covers jointly
        (14).
      max_search_bytes: bytes of logits per tile of the batch entropy's softmax (None: the
        device's default).

    Indices: B×H×W integers Σ_i 2^i·[z_i > 0], channel 0 the least significant bit (the paper's
    Eq. and Open-MAGVIT2; vector-quantize-pytorch makes channel 0 the most significant).
    """

    def __init__(
        self,
        code_dim: int = 10,
        beta: float = 0.25,
        entropy_weight: float = 0.1,
        entropy_temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        batch_entropy_weight: float = 1.0,
        entropy_group_bits: int = 14,
        max_search_bytes: int | None = None,
    ):
        super().__init__()
        _check(
            isinstance(code_dim, int) and 1 <= code_dim <= MAX_BITS,
            f"code_dim (bits, K = 2^code_dim) must be an integer in [1, {MAX_BITS}], got "
            f"{code_dim!r}",
        )
        for name, value in (
            ("beta", beta),
            ("entropy_weight", entropy_weight),
            ("sample_entropy_weight", sample_entropy_weight),
            ("batch_entropy_weight", batch_entropy_weight),
        ):
            _check(value >= 0, f"{name} must be >= 0, got {value!r}")
        _check(
            entropy_temperature > 0,
            f"entropy_temperature must be > 0, got {entropy_temperature!r}",
        )
        _check(
            isinstance(entropy_group_bits, int) and entropy_group_bits >= 1,
            f"entropy_group_bits must be an integer >= 1, got {entropy_group_bits!r}",
        )
        _check(
            max_search_bytes is None or max_search_bytes >= 4,
            f"max_search_bytes must be >= 4 (one score) or None, got {max_search_bytes!r}",
        )
        self.code_dim = code_dim
        self.num_codes = 2**code_dim
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight = sample_entropy_weight
        self.batch_entropy_weight = batch_entropy_weight
        self.entropy_group_bits = entropy_group_bits
        self.max_search_bytes = max_search_bytes
        self.groups = bit_groups(code_dim, entropy_group_bits)
        self.register_buffer("_powers", 2 ** torch.arange(code_dim), persistent=False)

    def _group_codes(self, bits: int, device) -> torch.Tensor:
        """The 2^bits codes of a group times 2 (so that z·codes are the logits 2 z·c), ±2."""
        codes = torch.arange(2**bits, device=device)[:, None] >> torch.arange(bits, device=device)
        return (codes & 1).float() * 4 - 2

    def entropies(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean per-row entropy on this process, entropy of the mean over every process's rows):
        one all-reduce."""
        tau = self.entropy_temperature
        sample = binary_entropy(rows * (4 / tau)).sum(1).mean()
        if self.batch_entropy_weight == 0:
            return sample, rows.new_zeros(())
        detached = rows.detach()
        codes = [self._group_codes(b - a, rows.device) for a, b in self.groups]
        stats = [
            softmax_stats(detached[:, a:b], c, self.max_search_bytes, temperature=tau)
            for (a, b), c in zip(self.groups, codes)
        ]
        for s in stats:  # only the batch's mass is needed
            s.entropy = None
        packed = all_reduce_sum(torch.cat([*(s.mass for s in stats), rows.new_tensor([len(rows)])]))
        total = packed[-1]
        masses = packed[:-1].split([len(c) for c in codes])
        batch = sum(
            CodeSoftmax.apply(
                rows[:, a:b],
                c,
                s,
                mass / total,
                tau,
                world_size() / total,
                self.max_search_bytes,
            )[2]
            for (a, b), c, s, mass in zip(self.groups, codes, stats, masses)
        )
        return sample, batch

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            rows = self._to_rows(zf)
            positive = rows > 0
            quantized = positive.float() * 2 - 1
            flat_indices = (positive.long() * self._powers).sum(1)
            commitment_loss = F.mse_loss(rows, quantized)
            loss = self.beta * commitment_loss
            if self.training and self.entropy_weight > 0:
                sample, batch = self.entropies(rows)
                penalty = self.sample_entropy_weight * sample - self.batch_entropy_weight * batch
                loss = loss + self.entropy_weight * penalty
            z_hat = self._assemble(quantized, flat_indices.view(self._index_shape(zf)))
            z_q = straight_through(zf, z_hat).to(in_dtype)
        return self._output(z_q, loss, flat_indices, zf, rows.new_zeros(()), commitment_loss)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        bits = (indices.reshape(-1, 1) >> torch.arange(self.code_dim, device=indices.device)) & 1
        return self._assemble(bits.float() * 2 - 1, indices)

    def extra_repr(self) -> str:
        return (
            f"code_dim={self.code_dim}, num_codes={self.num_codes}, beta={self.beta}, "
            f"entropy_weight={self.entropy_weight}, groups={self.groups}"
        )
