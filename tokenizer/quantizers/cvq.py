"""CVQ: the online clustered codebook (Zheng & Vedaldi, "Online Clustered Codebook", ICCV 2023,
Sec. 3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .core import CodebookQuantizer, _check
from .distributed import all_reduce_sum, sum_counts_and_pick_anchors
from .search import search_and_anchor, search_budget

ANCHORS = ("random", "unique", "closest", "probabilistic", "none")
# the contrastive loss holds at most this many search tiles of similarities (64 MiB on the CPU):
# one chunk, as the dense formula, at the papers' MNIST sizes; chunks recomputed in the backward
# pass (about 1.5× the time) only where the N×K matrix would be larger
CONTRASTIVE_TILES = 64


class ClusteredQuantizer(CodebookQuantizer):
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
        "probabilistic" feature i with probability softmax_i(−D_ik);
        "none"          no anchor update at all (the usage N_k is still tracked): LooC's
                        Tab. 7 ablation, plain VQ with this class's options.
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
        ``contrastive_temperature`` (0.07). Computed for a chunk of codes at a time (at most
        ``CONTRASTIVE_TILES`` search tiles of similarities, or one column of N),
        recomputed in the backward pass, so a large N×K similarity matrix is never held.

    State (saved in the state dict, so a resumed run continues exactly): ``usage`` (N_k) and
    ``initialised`` (the offline variant's flag, read from the device once, then known on the
    host).

    Randomness: anchors are drawn from torch's global RNG, so ``torch.manual_seed`` makes a
    run reproducible and a checkpoint of the RNG states resumes it. With several processes
    each must seed differently (``accelerate.utils.set_seed(seed, device_specific=True)``, as
    the trainers do), so that their candidates are independent draws.

    Communication: one collective per training step (the counts and every process's anchor
    candidates, gathered together; only the counts after the offline re-initialisation or with
    ``anchor="none"``).
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
        self._known: bool | None = None  # ``initialised`` on the host; None: read the buffer

    def _initialised(self) -> bool:
        if self._known is None:
            self._known = bool(self.initialised)
        return self._known

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known = None

    # --- anchors ------------------------------------------------------------------------------
    def search(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The nearest codes; in a training step that updates the codebook with "closest" or
        "probabilistic" anchors, the anchor candidates come from the same pass over the scores
        (:func:`~.search.search_and_anchor`) and are kept for ``_candidates``."""
        anchored = self.training and self.anchor in ("closest", "probabilistic")
        if not (anchored and (self.online or not self._initialised())):
            return super().search(rows, codes)
        self._found = search_and_anchor(
            rows,
            codes,
            self.distance,
            anchor=self.anchor,
            max_bytes=self.max_search_bytes,
        )
        return self._found.indices

    def _candidates(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's anchor candidate for every code (K×d) and its score (K): the
        highest score over all processes wins."""
        n, k = rows.shape[0], self.num_codes
        if self.anchor in ("closest", "probabilistic"):
            found, self._found = self._found, None
            score, where = found.anchor_score, found.anchor_row
        else:
            if self.anchor == "random":
                where = torch.randint(0, n, (k,), device=rows.device)
            else:  # unique; with fewer features than codes, repeats are unavoidable
                perms = [torch.randperm(n, device=rows.device) for _ in range(math.ceil(k / n))]
                where = torch.cat(perms)[:k]
            score = torch.rand(k, device=rows.device)
        return score, rows[where]

    # --- contrastive loss ---------------------------------------------------------------------
    def _contrastive_loss(self, rows: torch.Tensor) -> torch.Tensor | None:
        n, k = rows.shape[0], self.num_codes
        if self.contrastive_weight == 0 or n < 2:
            return None
        # clone: the in-place codebook update below must not touch a tensor saved for backward
        codes = self.codebook.clone().float()
        elements = search_budget(rows.device, self.max_search_bytes)
        chunk = max(1, CONTRASTIVE_TILES * elements // n)
        total = sum(
            checkpoint(
                self._contrastive_terms,
                rows,
                codes[start : start + chunk],
                n // k,
                use_reentrant=False,
            )
            if chunk < k
            else self._contrastive_terms(rows, codes, n // k)
            for start in range(0, k, chunk)
        )
        return self.contrastive_weight * total / k

    def _contrastive_terms(self, rows, codes, positives: int) -> torch.Tensor:
        """The summed cross-entropy of ``codes`` (a chunk): its N×chunk similarities only."""
        if self.distance == "cosine":
            sim = F.normalize(rows, dim=1) @ F.normalize(codes, dim=1).t()
        else:
            sim = -torch.cdist(rows, codes).pow(2)
        positive = sim.topk(max(1, positives), dim=0).values.mean(0, keepdim=True)
        negatives = sim.topk(len(rows) // 2, dim=0, largest=False).values
        logits = torch.cat([positive, negatives]).t() / self.contrastive_temperature
        target = torch.zeros(len(codes), dtype=torch.long, device=rows.device)
        return F.cross_entropy(logits, target, reduction="sum")

    # --- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def _update_usage(self, counts: torch.Tensor) -> None:
        """Eq. 4 with the counts summed over the processes."""
        self.usage.mul_(self.decay).add_(counts / counts.sum().clamp(min=1), alpha=1 - self.decay)

    def _update_codebook(self, rows, indices, counts):
        extra = self._contrastive_loss(rows)
        with torch.no_grad():
            if self.anchor == "none" or not (self.online or not self._initialised()):
                self._update_usage(all_reduce_sum(counts.float()))
                return extra
            counts, anchors = sum_counts_and_pick_anchors(counts.float(), *self._candidates(rows))
            self._update_usage(counts)
            alpha = torch.exp(-self.usage * self.num_codes * 10 / (1 - self.decay) - self.epsilon)
            self.codebook.lerp_(anchors, alpha.unsqueeze(1))
            self.initialised.fill_(True)
            self._known = True
        return extra

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", anchor={self.anchor!r}, decay={self.decay}, "
            f"online={self.online}, "
            f"contrastive_weight={self.contrastive_weight}"
        )
