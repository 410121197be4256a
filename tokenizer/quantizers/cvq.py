"""CVQ: the online clustered codebook (Zheng & Vedaldi, "Online Clustered Codebook", ICCV 2023,
Sec. 3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import Quantizer, _check
from .distributed import all_reduce_sum, pick_best_across_processes, rank
from .search import search_and_anchor

ANCHORS = ("random", "unique", "closest", "probabilistic")


class ClusteredQuantizer(Quantizer):
    """VQ whose under-used codes are pulled toward anchors drawn from the encoded features.

    After every training step (only in ``train()`` mode):
      N_k ← γ·N_k + (1−γ)·n_k / (Bhw)                        (Eq. 4, running average usage)
      α_k = exp(−N_k·K·10 / (1−γ) − ε)                         (Eq. 5)
      e_k ← (1−α_k)·e_k + α_k·ẑ_k                               (Eq. 6, ẑ_k the anchor of code k)
    so a code nobody uses (N_k ≈ 0, α_k ≈ 1) jumps to its anchor, a busy code barely moves.

    Options (besides ``num_codes``, ``code_dim``, ``beta``, ``distance``; the defaults,
    ``distance="cosine"`` and ``anchor="probabilistic"``, are those of the official code):
      anchor: how the anchor ẑ_k of each code is drawn from this step's features (Sec. 3.2):
        "random"        a uniformly random feature (with replacement);
        "unique"        distinct features (first K of a random permutation);
        "closest"       the feature closest to e_k;
        "probabilistic" feature i with probability softmax_i(−D_ik).
        With several processes each draws candidates from its own features and the same winner
        is chosen everywhere (for "random"/"unique" uniformly, for "closest" the closest over all
        processes, for "probabilistic" an exact Gumbel-max sample over all features).
      decay: γ of Eq. 4 (0.99).
      epsilon: ε of Eq. 5 (1e-3, the value of the official code).
      online: True for the paper's online method; False for its offline variant (Tab. 3 C),
        which re-initialises the codebook from anchors on the first training batch only.
      contrastive_weight: weight of the contrastive loss (Tab. 3 E; 0 = off, the official code
        uses 1): for each code, positive = mean similarity of its N/K closest features,
        negatives = its farthest half of the features, cross-entropy at temperature
        ``contrastive_temperature`` (0.07). Needs the full N×K similarity matrix.

    State (saved in the state dict, so a resumed run continues exactly): ``usage`` (N_k) and
    ``initialised`` (the offline variant's flag).
    """

    def __init__(
        self,
        num_codes: int = 1024,
        code_dim: int = 64,
        beta: float = 0.25,
        distance: str = "cosine",
        anchor: str = "probabilistic",
        decay: float = 0.99,
        epsilon: float = 1e-3,
        online: bool = True,
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 0.07,
        **common,
    ):
        super().__init__(num_codes, code_dim, beta, distance, **common)
        _check(anchor in ANCHORS, f"anchor must be one of {ANCHORS}, got {anchor!r}")
        _check(0 < decay < 1, f"decay (gamma) must be in (0, 1), got {decay!r}")
        _check(epsilon >= 0, f"epsilon must be >= 0, got {epsilon!r}")
        _check(
            contrastive_weight >= 0, f"contrastive_weight must be >= 0, got {contrastive_weight!r}"
        )
        _check(
            contrastive_temperature > 0,
            f"contrastive_temperature must be > 0, got {contrastive_temperature!r}",
        )
        self.anchor = anchor
        self.decay = decay
        self.epsilon = epsilon
        self.online = online
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature = contrastive_temperature
        self.register_buffer("usage", torch.zeros(num_codes))
        self.register_buffer("initialised", torch.tensor(False))

    # --- anchors ------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded from the global RNG (so runs are reproducible and resumable) and
        offset by the process rank (so processes draw different candidates)."""
        seed = int(torch.randint(0, 2**62, (1,)))
        return torch.Generator(device=device).manual_seed(seed + 1_000_003 * rank())

    def search(self, rows: torch.Tensor) -> torch.Tensor:
        """The nearest codes; in a training step that updates the codebook with "closest" or
        "probabilistic" anchors, the anchor candidates come from the same pass over the scores
        (:func:`~.search.search_and_anchor`) and are kept for ``_anchors``."""
        anchored = self.training and self.anchor in ("closest", "probabilistic")
        if not (anchored and (self.online or not bool(self.initialised))):
            return super().search(rows)
        self._found = search_and_anchor(
            rows,
            self.codebook.detach().float(),
            self.distance,
            anchor=self.anchor,
            generator=self._generator(rows.device),
            tile_elements=self.max_search_elements,
        )
        return self._found.indices

    def _anchors(self, rows: torch.Tensor) -> torch.Tensor:
        n, k = rows.shape[0], self.num_codes
        if self.anchor in ("closest", "probabilistic"):
            found, self._found = self._found, None
            score, where = found.anchor_score, found.anchor_row
        else:
            gen = self._generator(rows.device)
            if self.anchor == "random":
                where = torch.randint(0, n, (k,), generator=gen, device=rows.device)
            else:  # unique; with fewer features than codes, repeats are unavoidable
                perms = [
                    torch.randperm(n, generator=gen, device=rows.device)
                    for _ in range(math.ceil(k / n))
                ]
                where = torch.cat(perms)[:k]
            score = torch.rand(k, generator=gen, device=rows.device)
        return pick_best_across_processes(score, rows[where])

    # --- contrastive loss ---------------------------------------------------------------------
    def _contrastive_loss(self, rows: torch.Tensor) -> torch.Tensor | None:
        n = rows.shape[0]
        if self.contrastive_weight == 0 or n < 2:
            return None
        # clone: the in-place codebook update below must not touch a tensor saved for backward
        codes = self.codebook.clone().float()
        if self.distance == "cosine":
            sim = F.normalize(rows, dim=1) @ F.normalize(codes, dim=1).t()
        else:
            sim = -torch.cdist(rows, codes).pow(2)
        positive = sim.topk(max(1, n // self.num_codes), dim=0).values.mean(0, keepdim=True)
        negatives = sim.topk(n // 2, dim=0, largest=False).values
        logits = torch.cat([positive, negatives]).t() / self.contrastive_temperature
        target = torch.zeros(self.num_codes, dtype=torch.long, device=rows.device)
        return self.contrastive_weight * F.cross_entropy(logits, target)

    # --- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def _update_usage(self, counts: torch.Tensor) -> None:
        counts = all_reduce_sum(counts.float())
        self.usage.mul_(self.decay).add_(counts / counts.sum().clamp(min=1), alpha=1 - self.decay)

    def _update_codebook(self, rows, indices, counts):
        extra = self._contrastive_loss(rows)
        self._update_usage(counts)
        if self.online or not bool(self.initialised):
            with torch.no_grad():
                alpha = torch.exp(
                    -self.usage * self.num_codes * 10 / (1 - self.decay) - self.epsilon
                )
                self.codebook.lerp_(self._anchors(rows), alpha.unsqueeze(1))
                self.initialised.fill_(True)
        return extra

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", anchor={self.anchor!r}, decay={self.decay}, "
            f"online={self.online}, "
            f"contrastive_weight={self.contrastive_weight}"
        )
