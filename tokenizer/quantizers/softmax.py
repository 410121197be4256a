"""The softmax of the logits z·e_k over every code k, in tiles: IBQ's straight-through one-hot and
the entropy penalty of LFQ and IBQ, without ever holding the N×K matrix.

Rows are processed in tiles of ``rows × codes`` logits of at most a memory budget (the search's:
:func:`~.search.tile_shape`, :func:`~.search.search_budget`); a tile covers the whole codebook
when the budget allows, else chunks of codes with running per-row values (maximum,
log-sum-exp) across the chunks. The forward pass keeps O(N + K)
numbers (:class:`SoftmaxStats`); the backward pass recomputes the tiles (twice when the codebook
is chunked: once for the per-row sums the softmax Jacobian needs, once for the gradients).

Gradients, with l = z·eᵀ (a row's logits), s = softmax(l), p = softmax(l / τ):
- one-hot straight-through (IBQ), z_q = Σ_k (hard_k − sg[s_k] + s_k)·e_k, upstream g:
  ∂/∂l_k = s_k (g·e_k − Σ_j s_j g·e_j), and e_index receives g directly;
- per-row entropy H = −Σ p log p: ∂H/∂(l_k/τ) = −p_k (log p_k + H);
- entropy of the batch mean p̄ (over all processes), with c_k = ∂H(p̄)/∂p_k:
  ∂/∂(l_k/τ) = p_k (c_k − Σ_j c_j p_j).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .search import search_budget, tile_shape


@dataclass
class SoftmaxStats:
    """Per row (N): ``index`` (argmax of the logits, the first on ties), ``lse`` (their
    log-sum-exp), ``lse_t`` (log-sum-exp of logits / τ), ``entropy`` (of softmax(logits / τ));
    per code (K): ``mass`` (Σ over the rows of softmax(logits / τ)). None where not asked for."""

    index: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    lse_t: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mass: torch.Tensor | None = None


def _chunks(k: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, k)) for start in range(0, k, step)]


def _merge_lse(m: torch.Tensor, s: torch.Tensor, logits: torch.Tensor) -> None:
    """Running log-sum-exp, as max ``m`` and Σ exp(· − m) ``s``, updated in place by a chunk."""
    top = torch.maximum(m, logits.amax(1))
    s.mul_((m - top).exp()).add_((logits - top[:, None]).exp().sum(1))
    m.copy_(top)


@torch.no_grad()
def softmax_stats(
    z: torch.Tensor,
    codes: torch.Tensor,
    max_bytes: int | None,
    argmax: bool = False,
    logsumexp: bool = False,
    temperature: float | None = None,
) -> SoftmaxStats:
    """What the forward pass needs of softmax(z·codesᵀ), for N×d ``z`` and K×d ``codes`` (float32):
    the argmax, the log-sum-exp, and with ``temperature`` the per-row entropies and the summed
    probabilities at that temperature (a second pass over the tiles when the codebook is
    chunked). Tiles of at most ``max_bytes`` of logits (None: the device's default)."""
    n, k = len(z), len(codes)
    rows, step = tile_shape(n, k, search_budget(z.device, max_bytes))
    chunks = _chunks(k, step)
    stats = SoftmaxStats()
    if argmax:
        stats.index = torch.zeros(n, dtype=torch.long, device=z.device)
    if logsumexp:
        stats.lse = torch.empty(n, device=z.device)
    if temperature is not None:
        stats.lse_t = torch.empty(n, device=z.device)
        stats.entropy = torch.zeros(n, device=z.device)
        stats.mass = torch.zeros(k, device=z.device)
    for r0 in range(0, n, rows):
        zr = z[r0 : r0 + rows]
        best = torch.full((len(zr),), float("-inf"), device=z.device)
        m1, mt = torch.full_like(best, float("-inf")), torch.full_like(best, float("-inf"))
        s1, st = torch.zeros_like(best), torch.zeros_like(best)
        whole = zr @ codes.t() if len(chunks) == 1 else None  # computed once, used twice
        for c0, c1 in chunks:
            logits = zr @ codes[c0:c1].t() if whole is None else whole
            if argmax:
                value, where = logits.max(1)
                lead = value > best  # strictly: an earlier chunk keeps a tie
                index = stats.index[r0 : r0 + len(zr)]  # no boolean indexing: no host wait
                index.copy_(torch.where(lead, where + c0, index))
                best = torch.where(lead, value, best)
            if logsumexp:
                _merge_lse(m1, s1, logits)
            if temperature is not None:
                _merge_lse(mt, st, logits / temperature)
        if logsumexp:
            stats.lse[r0 : r0 + len(zr)] = m1 + s1.log()
        if temperature is None:
            continue
        lse_t = stats.lse_t[r0 : r0 + len(zr)] = mt + st.log()
        for c0, c1 in chunks:  # the probabilities, now that their normaliser is known
            logits = zr @ codes[c0:c1].t() if whole is None else whole
            log_p = logits / temperature - lse_t[:, None]
            p = log_p.exp()
            stats.entropy[r0 : r0 + len(zr)] -= (p * log_p).sum(1)
            stats.mass[c0:c1] += p.sum(0)
    return stats


def entropy_of(p: torch.Tensor) -> torch.Tensor:
    """−Σ p log p (0 log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum()


class CodeSoftmax(torch.autograd.Function):
    """``(z_q, sample_entropy, batch_entropy) = CodeSoftmax.apply(z, codes, stats, mean_p,
    temperature, batch_scale, max_bytes)``.

    - ``z_q`` = codes[stats.index] (exactly), with the gradient of IBQ's one-hot
      straight-through (an empty N×0 tensor when ``stats.index`` is None);
    - ``sample_entropy`` = mean over the rows of the entropy of softmax(z·codesᵀ / τ) (0 when
      ``stats.entropy`` is None);
    - ``batch_entropy`` = the entropy of ``mean_p``, the mean of those distributions over every
      row of every process (0 when None). Its gradient is that of this process's rows times
      ``batch_scale``: world size / rows of all processes, so that averaging the gradients over
      the processes (DDP) gives the exact gradient of the entropy of the global mean.
    """

    @staticmethod
    def forward(ctx, z, codes, stats: SoftmaxStats, mean_p, temperature, batch_scale, max_bytes):
        ctx.stats, ctx.temperature, ctx.batch_scale = stats, temperature, batch_scale
        ctx.elements = search_budget(z.device, max_bytes)
        ctx.save_for_backward(z, codes, mean_p)
        zero = z.new_zeros(())
        z_q = z.new_empty(len(z), 0) if stats.index is None else codes[stats.index]
        sample = zero if stats.entropy is None else stats.entropy.mean()
        batch = zero if mean_p is None else entropy_of(mean_p)
        return z_q, sample, batch

    @staticmethod
    def backward(ctx, g_zq, g_sample, g_batch):
        z, codes, mean_p = ctx.saved_tensors
        stats, tau = ctx.stats, ctx.temperature
        straight = stats.index is not None and g_zq is not None
        # per row: weight of −p (log p + H); per code: c_k, the batch entropy's ∂/∂p_k
        sample = None if stats.entropy is None else g_sample / len(z)
        batch = None
        if mean_p is not None:
            batch = -(mean_p.clamp(min=1e-30).log() + 1) * (ctx.batch_scale * g_batch)
        dz, dcodes = torch.zeros_like(z), torch.zeros_like(codes)
        if straight:
            dcodes.index_add_(0, stats.index, g_zq)  # the hard one-hot's own gradient
        if not straight and sample is None and batch is None:
            return dz, dcodes, None, None, None, None, None
        n, k = len(z), len(codes)
        rows, step = tile_shape(n, k, ctx.elements)
        chunks = _chunks(k, step)
        for r0 in range(0, n, rows):
            sl = slice(r0, r0 + rows)
            zr = z[sl]
            gr = g_zq[sl] if straight else None

            def tile(c0, c1):
                logits = zr @ codes[c0:c1].t()
                parts = {}
                if straight:
                    parts["s"] = (logits - stats.lse[sl, None]).exp()
                    parts["ge"] = gr @ codes[c0:c1].t()
                if sample is not None or batch is not None:
                    parts["log_p"] = logits / tau - stats.lse_t[sl, None]
                    parts["p"] = parts["log_p"].exp()
                return parts

            def sums(parts, c0, c1):  # Σ_j s_j g·e_j and Σ_j c_j p_j of these codes
                s_ge = (parts["s"] * parts["ge"]).sum(1) if straight else None
                c_p = parts["p"] @ batch[c0:c1] if batch is not None else None
                return s_ge, c_p

            def gradient(parts, c0, c1, s_ge, c_p):
                dl = parts["s"] * (parts["ge"] - s_ge[:, None]) if straight else 0
                if sample is not None or batch is not None:
                    inner = 0
                    if sample is not None:
                        inner = -sample * (parts["log_p"] + stats.entropy[sl, None])
                    if batch is not None:
                        inner = inner + (batch[c0:c1] - c_p[:, None])
                    dl = dl + parts["p"] * inner / tau
                dz[sl] += dl @ codes[c0:c1]
                dcodes[c0:c1] += dl.t() @ zr

            if len(chunks) == 1:  # the whole codebook in one tile: one pass
                parts = tile(0, k)
                gradient(parts, 0, k, *sums(parts, 0, k))
                continue
            s_ge = torch.zeros(len(zr), device=z.device) if straight else None
            c_p = torch.zeros(len(zr), device=z.device) if batch is not None else None
            for c0, c1 in chunks:
                a, b = sums(tile(c0, c1), c0, c1)
                if straight:
                    s_ge += a
                if batch is not None:
                    c_p += b
            for c0, c1 in chunks:
                gradient(tile(c0, c1), c0, c1, s_ge, c_p)
        return dz, dcodes, None, None, None, None, None
