"""IBQ: index backpropagation quantization (Shi et al., "Scalable Image Tokenization with Index
Backpropagation Quantization", 2024; the official code's ``IndexPropagationQuantize`` and its
ImageNet configs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import CodebookQuantizer, QuantizerOutput, _check
from .distributed import all_reduce_sum, world_size
from .softmax import CodeSoftmax, softmax_stats


class IBQQuantizer(CodebookQuantizer):
    """The logits of a feature z are its dot products with every code, l_k = z·e_k; its code is
    the argmax, and z_q = Σ_k (hard_k − sg[s_k] + s_k)·e_k with s = softmax(l): the value of the
    chosen code, the gradient of the softmax over **all** codes, so every code is trained at
    every step (no code is left behind). There is no identity path from z_q to z: the
    encoder's gradient also goes through the softmax.

    Loss (the official code): ‖z_q − z‖² + beta·‖z − sg[e]‖² + codebook_loss_weight·‖sg[z] − e‖²
    (e the chosen code; the official weights 1 and 0.25 are VQGAN's "legacy" placement) +
    entropy_weight·(sample_entropy_weight·E_n[H(p_n)] − batch_entropy_weight·H(E_n[p_n])) with
    p_n = softmax(l / τ), the batch mean over all processes (one all-reduce per training
    forward; the official code takes each GPU's own batch).

    No N×K matrix is formed: argmax, softmax statistics and the gradients of the softmax are
    computed in tiles of at most ``max_search_bytes`` of logits (``softmax.py``), the tiles
    recomputed in the backward pass.

    Options (defaults: the official ImageNet configs for 1,024 / 16,384 / 262,144 codes):
      num_codes: K (1024); code_dim: d (256).
      beta: commitment weight (1.0).
      codebook_loss_weight: weight of the codebook term (0.25, the official ``beta``).
      entropy_weight: weight of the entropy penalty (0.05); entropy_temperature: τ (0.01);
      sample_entropy_weight, batch_entropy_weight: the two entropies' weights (1, 1).
      max_search_bytes: bytes of logits per tile (None: the device's default, 1 MiB on the
        CPU, 256 MiB on a GPU).
    The codebook starts from N(0, 1), ``nn.Embedding``'s default, which the official code keeps.
    """

    distances = ("dot",)

    def __init__(
        self,
        num_codes: int = 1024,
        code_dim: int = 256,
        beta: float = 1.0,
        codebook_loss_weight: float = 0.25,
        entropy_weight: float = 0.05,
        entropy_temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        batch_entropy_weight: float = 1.0,
        max_search_bytes: int | None = None,
    ):
        super().__init__(num_codes, code_dim, beta, "dot", max_search_bytes)
        for name, value in (
            ("codebook_loss_weight", codebook_loss_weight),
            ("entropy_weight", entropy_weight),
            ("sample_entropy_weight", sample_entropy_weight),
            ("batch_entropy_weight", batch_entropy_weight),
        ):
            _check(value >= 0, f"{name} must be >= 0, got {value!r}")
        _check(
            entropy_temperature > 0,
            f"entropy_temperature must be > 0, got {entropy_temperature!r}",
        )
        self.codebook_loss_weight = codebook_loss_weight
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight = sample_entropy_weight
        self.batch_entropy_weight = batch_entropy_weight

    def _initial_codebook(self, num_codes: int, code_dim: int) -> torch.Tensor:
        return torch.randn(num_codes, code_dim)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float()
            rows = self._to_rows(zf)
            codes = self.codes()
            entropy = self.training and self.entropy_weight > 0
            gradient = torch.is_grad_enabled() and (rows.requires_grad or codes.requires_grad)
            tau = self.entropy_temperature
            stats = softmax_stats(
                rows.detach(),
                codes.detach(),
                self.max_search_bytes,
                argmax=True,
                logsumexp=gradient,
                temperature=tau if entropy else None,
            )
            mean_p, scale = None, 1.0
            if entropy:
                packed = all_reduce_sum(torch.cat([stats.mass, rows.new_tensor([len(rows)])]))
                mean_p, scale = packed[:-1] / packed[-1], world_size() / packed[-1]
            quantized, sample, batch = CodeSoftmax.apply(
                rows, codes, stats, mean_p, tau, scale, self.max_search_bytes
            )
            chosen = F.embedding(stats.index, codes)
            codebook_loss = F.mse_loss(chosen, rows.detach())
            commitment_loss = F.mse_loss(rows, chosen.detach())
            loss = (
                F.mse_loss(quantized, rows)
                + self.beta * commitment_loss
                + self.codebook_loss_weight * codebook_loss
            )
            if entropy:
                penalty = self.sample_entropy_weight * sample - self.batch_entropy_weight * batch
                loss = loss + self.entropy_weight * penalty
            indices = stats.index.view(self._index_shape(zf))
            z_q = self._assemble(quantized, indices).to(in_dtype)
        return self._output(z_q, loss, stats.index, zf, codebook_loss, commitment_loss)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", codebook_loss_weight={self.codebook_loss_weight}, "
            f"entropy_weight={self.entropy_weight}"
        )
