"""Nearest-code search, memory-bounded.

The N×K score matrix is never materialised whole: rows are processed in chunks of at most
``max_elements // K`` vectors, and only an argmax per row (``nearest_code``) or a running max per
column (``best_feature_per_code``) is kept. Nothing is sorted. This is the one place a fused GPU
kernel would replace.

Scores are similarities (higher is closer): cosine similarity for ``"cosine"`` and the negative
squared Euclidean distance for ``"l2"``. Callers pass float32 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTANCES = ("l2", "cosine")

# 2**26 float32 scores = 256 MiB per chunk.
DEFAULT_MAX_ELEMENTS = 2**26


def _prepare(codebook: torch.Tensor, distance: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if distance == "cosine":
        return F.normalize(codebook, dim=1), None
    return codebook, codebook.pow(2).sum(1)


def _scores(
    x: torch.Tensor, codes: torch.Tensor, code_sq: torch.Tensor | None, per_code: bool = False
) -> torch.Tensor:
    """Similarity of each row of ``x`` to each code: n×K, or K×n with ``per_code=True`` (the
    layout whose rows a max over features runs along). The n×K l2 score omits the per-row
    constant −‖x‖², which does not change a row's argmax; the K×n one is the full score."""
    if code_sq is None:  # cosine
        x = F.normalize(x, dim=1)
        return codes @ x.t() if per_code else x @ codes.t()
    if not per_code:
        return torch.addmm(code_sq, x, codes.t(), beta=-1.0, alpha=2.0)  # 2x·e − ‖e‖²
    scores = torch.addmm(code_sq.unsqueeze(1), codes, x.t(), beta=-1.0, alpha=2.0)
    return scores.sub_(x.pow(2).sum(1))


def _chunks(n: int, k: int, max_elements: int):
    step = max(1, max_elements // max(k, 1))
    for start in range(0, n, step):
        yield start, min(start + step, n)


@torch.no_grad()
def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    distance: str = "l2",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Index of the closest code for every row of ``x`` (N×d) in ``codebook`` (K×d): Eq. 2 of
    CVQ-VAE, argmin over codes of the distance. Returns a long tensor of length N."""
    codes, code_sq = _prepare(codebook, distance)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start, end in _chunks(x.shape[0], codes.shape[0], max_elements):
        out[start:end] = _scores(x[start:end], codes, code_sq).argmax(1)
    return out


@torch.no_grad()
def best_feature_per_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    distance: str = "l2",
    gumbel: bool = False,
    generator: torch.Generator | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every code, the row of ``x`` with the highest score and that score (two tensors of
    length K).

    ``gumbel=False`` gives the closest feature of each code ("closest" anchors). ``gumbel=True``
    adds independent Gumbel noise to every score before the max, which draws row i with
    probability softmax_i(score_ik): the "probabilistic random" anchors of CVQ-VAE Sec. 3.2,
    p = exp(−D_ik) / Σ_i exp(−D_ik), sampled without forming the N×K softmax.
    """
    codes, code_sq = _prepare(codebook, distance)
    k = codes.shape[0]
    best = torch.full((k,), float("-inf"), device=x.device, dtype=x.dtype)
    where = torch.zeros(k, dtype=torch.long, device=x.device)
    for start, end in _chunks(x.shape[0], k, max_elements):
        scores = _scores(x[start:end], codes, code_sq, per_code=True)
        if gumbel:
            u = torch.rand(scores.shape, generator=generator, device=x.device, dtype=x.dtype)
            scores -= torch.log(-torch.log(u.clamp_(min=1e-20)))
        value, row = scores.max(1)
        better = value > best
        best = torch.where(better, value, best)
        where = torch.where(better, row + start, where)
    return best, where
