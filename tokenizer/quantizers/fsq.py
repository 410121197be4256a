"""FSQ: finite scalar quantization (Mentzer, Minnen, Agustsson & Tschannen, "Finite Scalar
Quantization: VQ-VAE Made Simple", ICLR 2024, Sec. 3 and App. A.1)."""

from __future__ import annotations

import math

import torch

from .core import Quantizer, QuantizerOutput, _check

# the implicit codebook's size is bounded so that ``counts`` (length K) stays small
MAX_CODES = 2**24


class FSQQuantizer(Quantizer):
    """Each of the d = len(levels) channels is bounded to L_i levels and rounded; the implicit
    codebook is the grid of K = Π L_i points, so there is no codebook to learn and no auxiliary
    loss (``loss`` is 0).

    bound(z) = tanh(z + shift)·h − offset with h = (L − 1)(1 − ε)/2, offset = 1/2 for even L
    (0 for odd), shift = atanh(offset / h), ε = 1e-3 (App. A.1; the paper's listing writes tan,
    which its first author confirmed should be atanh, vector-quantize-pytorch issue 94);
    z_q = round(bound(z)) / ⌊L/2⌋ ∈ [−1, 1], with the gradient of bound(z) / ⌊L/2⌋ (the
    straight-through estimator around the rounding only). vector-quantize-pytorch uses
    (1 + ε) instead of (1 − ε) (so that L = 2 works): the same codes, thresholds 0.1–0.6%
    apart. Everything runs in float32 inside autocast: in bf16 the index arithmetic rounds
    integers above 256 (FSQ's usage fell to about 50% in bf16 elsewhere).

    Options:
      levels: L_i per channel, each >= 3 (the paper's Tab. 1: [8, 6, 5] ≈ 2^8, [8, 5, 5, 5]
        ≈ 2^10, [7, 5, 5, 5, 5] ≈ 2^12, [8, 8, 8, 6, 5] ≈ 2^14, [8, 8, 8, 5, 5, 5] ≈ 2^16).
      code_dim: the input's channels C; must equal len(levels) (the tokenizer's embed_dim).

    Indices: B×H×W mixed-radix integers Σ_i digit_i·Π_{j<i} L_j, digit_i = round + ⌊L_i/2⌋ ∈
    [0, L_i), channel 0 the least significant (the paper's ``codes_to_indexes``).
    """

    def __init__(self, levels: list[int] | tuple[int, ...] = (8, 5, 5, 5), code_dim=None):
        super().__init__()
        levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        _check(
            isinstance(levels, list)
            and len(levels) >= 1
            and all(isinstance(x, int) and x >= 3 for x in levels),
            f"levels must be a non-empty list of integers >= 3 (e.g. [8, 5, 5, 5]), got "
            f"{levels!r}; with 2 levels the paper's bound has no shift (use lfq for bits)",
        )
        _check(
            math.prod(levels) <= MAX_CODES,
            f"levels {levels} make {math.prod(levels):,} codes, more than {MAX_CODES:,}",
        )
        code_dim = len(levels) if code_dim is None else code_dim
        _check(
            code_dim == len(levels),
            f"FSQ quantizes one channel per level: code_dim (the encoder's embed_dim) must be "
            f"len(levels) = {len(levels)}, got {code_dim!r}",
        )
        self.levels = levels
        self.code_dim = len(levels)
        self.num_codes = math.prod(levels)
        eps = 1e-3
        t = torch.tensor(levels, dtype=torch.float64)
        half = (t - 1) * (1 - eps) / 2
        offset = (t % 2 == 0).double() / 2
        # constants, not state: rebuilt from ``levels`` (so not in the state dict)
        self.register_buffer("_half", half.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half).float(), persistent=False)
        self.register_buffer("_width", (t // 2).float(), persistent=False)
        basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            rows = self._to_rows(zf)
            bounded = torch.tanh(rows + self._shift) * self._half - self._offset
            rounded = bounded.detach().round()
            # value round(b)/⌊L/2⌋ exactly; gradient of b/⌊L/2⌋
            quantized = rounded / self._width + (bounded - bounded.detach()) / self._width
            digits = rounded.long() + self._width.long()
            flat_indices = (digits * self._basis).sum(1)
            indices = flat_indices.view(self._index_shape(zf))
            z_q = self._assemble(quantized, indices).to(in_dtype)
            zero = rows.new_zeros(())
        return self._output(z_q, zero, flat_indices, zf, zero, zero)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        digits = indices.reshape(-1, 1) // self._basis % self._levels
        rounded = (digits - self._width.long()).float()
        return self._assemble(rounded / self._width, indices)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, num_codes={self.num_codes}"
