"""SimVQ: a frozen codebook reparameterised by one learned linear map (Zhu, Li, Zhang & Liu,
"Addressing Representation Collapse in Vector Quantized Models with One Linear Layer", 2024,
Algorithm 1; the official code's ``SimVQ``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .core import CodebookQuantizer


class SimVQQuantizer(CodebookQuantizer):
    """The codes are C·Wᵀ + b: C a frozen K×d codebook drawn once from N(0, 1/d) (a buffer,
    saved with the model, the same on every process: drawn from ``codebook_seed``), W, b one
    learned ``nn.Linear(d, d)`` (``projection``). Every code moves whenever W does, so none is
    left behind. The nearest code is found in C·Wᵀ + b by the tiled search; the loss is the
    VQ-VAE loss ‖sg[z] − q‖² + beta·‖z − sg[q]‖² (Algorithm 1, the official code with
    ``legacy: false``), whose first term is what trains W; z_q has the identity gradient to z.

    Options (besides ``num_codes``, ``code_dim``, ``beta``, ``distance``, ``max_search_bytes``):
      codebook_seed: the seed of C (0).

    vector-quantize-pytorch's ``SimVQ`` differs by default: no bias in the linear map and the
    rotation trick instead of the straight-through estimator (``rotation_trick=False`` and a
    biased ``nn.Linear`` as ``codebook_transform`` give this quantizer).
    """

    trainable_codebook = False

    def __init__(
        self,
        num_codes: int = 1024,
        code_dim: int = 128,
        beta: float = 0.25,
        distance: str = "l2",
        codebook_seed: int = 0,
        **common,
    ):
        self.codebook_seed = codebook_seed
        super().__init__(num_codes, code_dim, beta, distance, **common)
        self.projection = nn.Linear(code_dim, code_dim)

    def _initial_codebook(self, num_codes: int, code_dim: int) -> torch.Tensor:
        frozen = torch.empty(num_codes, code_dim)
        if frozen.is_meta:  # a config check on the meta device: no values needed
            return frozen
        generator = torch.Generator().manual_seed(self.codebook_seed)
        values = torch.randn(num_codes, code_dim, generator=generator, device="cpu")
        return frozen.copy_(values * code_dim**-0.5)

    def codes(self) -> torch.Tensor:
        return self.projection(self.codebook.float())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", codebook_seed={self.codebook_seed}"
