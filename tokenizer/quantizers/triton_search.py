"""The search of :mod:`.search` as two fused Triton kernels, for GPUs: the scores of a block of
rows and a block of codes live in registers and are never written out; every row's nearest code
comes from one kernel (a program per block of rows, looping over the codes), every code's
anchor candidate from the other (a program per block of codes, looping over the rows). No N×K
memory, no host wait, two launches whatever N and K (the PyTorch path launches a few operators
per tile).

Scores as in :mod:`.search`: l2, 2x·e − ‖x‖² − ‖e‖² (the negative squared distance); cosine,
x·e / (‖x‖ ‖e‖); float32 products (``input_precision="ieee"``, no TF32). Ties go to the first
index, as ``argmax``. Probabilistic anchors: a Gumbel-max draw over all rows of every code, the
noise drawn in registers (Philox, ``tl.rand``) from a seed taken from the caller's generator on
the device: each row i with probability softmax_i(score_ik), and the returned score, the maximum
of score + Gumbel, is a Gumbel-max value of the whole set as on the PyTorch path.

Tested against the PyTorch path on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``).
Imported only where Triton is (see :func:`.search.triton_kernels`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS, BLOCK_CODES, BLOCK_DIMS = 64, 64, 32


@triton.jit
def _scores(x_ptr, c_ptr, rows, codes, n, k, d, x_sq, c_sq, COSINE: tl.constexpr, BD: tl.constexpr):
    """The rows × codes block of scores (``rows``, ``codes``: index vectors)."""
    s = tl.zeros((rows.shape[0], codes.shape[0]), dtype=tl.float32)
    for d0 in range(0, d, BD):
        dims = d0 + tl.arange(0, BD)
        x = tl.load(
            x_ptr + rows[:, None] * d + dims[None, :],
            mask=(rows[:, None] < n) & (dims[None, :] < d),
            other=0.0,
        )
        c = tl.load(
            c_ptr + codes[:, None] * d + dims[None, :],
            mask=(codes[:, None] < k) & (dims[None, :] < d),
            other=0.0,
        )
        s += tl.dot(x, tl.trans(c), input_precision="ieee")
    if COSINE:  # x_sq, c_sq hold the inverse norms
        s = s * x_sq[:, None] * c_sq[None, :]
    else:
        s = 2 * s - x_sq[:, None] - c_sq[None, :]
    return tl.where((rows[:, None] < n) & (codes[None, :] < k), s, float("-inf"))


@triton.jit
def _nearest(
    x_ptr,
    c_ptr,
    xs_ptr,
    cs_ptr,
    out_ptr,
    n,
    k,
    d,
    COSINE: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    x_sq = tl.load(xs_ptr + rows, mask=rows < n, other=0.0)
    best = tl.full((BN,), float("-inf"), tl.float32)
    where = tl.zeros((BN,), tl.int64)
    for k0 in range(0, k, BK):
        codes = k0 + tl.arange(0, BK)
        c_sq = tl.load(cs_ptr + codes, mask=codes < k, other=0.0)
        s = _scores(x_ptr, c_ptr, rows, codes, n, k, d, x_sq, c_sq, COSINE, BD)
        value = tl.max(s, 1)
        index = tl.argmax(s, 1).to(tl.int64) + k0
        lead = value > best  # strictly: an earlier block keeps a tie
        where = tl.where(lead, index, where)
        best = tl.where(lead, value, best)
    tl.store(out_ptr + rows, where, mask=rows < n)


@triton.jit
def _anchor(
    x_ptr,
    c_ptr,
    xs_ptr,
    cs_ptr,
    seed_ptr,
    best_ptr,
    row_ptr,
    n,
    k,
    d,
    COSINE: tl.constexpr,
    PROBABILISTIC: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    pid = tl.program_id(0)
    codes = pid * BK + tl.arange(0, BK)
    c_sq = tl.load(cs_ptr + codes, mask=codes < k, other=0.0)
    seed = tl.load(seed_ptr) + pid  # one random stream per block of codes
    best = tl.full((BK,), float("-inf"), tl.float32)
    where = tl.zeros((BK,), tl.int64)
    for n0 in range(0, n, BN):
        rows = n0 + tl.arange(0, BN)
        x_sq = tl.load(xs_ptr + rows, mask=rows < n, other=0.0)
        s = tl.trans(_scores(x_ptr, c_ptr, rows, codes, n, k, d, x_sq, c_sq, COSINE, BD))
        if PROBABILISTIC:  # + Gumbel noise: the argmax over all rows is a softmax draw
            offsets = rows[None, :] * BK + tl.arange(0, BK)[:, None]
            u = tl.maximum(tl.rand(seed, offsets), 1e-20)
            s = s - tl.log(-tl.log(u))
        value = tl.max(s, 1)
        index = tl.argmax(s, 1).to(tl.int64) + n0
        lead = value > best
        where = tl.where(lead, index, where)
        best = tl.where(lead, value, best)
    tl.store(best_ptr + codes, best, mask=codes < k)
    tl.store(row_ptr + codes, where, mask=codes < k)


def search_and_anchor(
    x: torch.Tensor,
    codebook: torch.Tensor,
    distance: str,
    anchor: str | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(nearest code of every row, anchor scores, anchor rows): the kernels' launches (two with
    anchors, one without) on contiguous float32 ``x`` (N×d) and ``codebook`` (K×d)."""
    x, codebook = x.float().contiguous(), codebook.float().contiguous()
    (n, d), k = x.shape, len(codebook)
    cosine = distance == "cosine"
    if cosine:  # inverse norms, as F.normalize (eps 1e-12)
        x_sq = 1 / x.norm(dim=1).clamp_min(1e-12)
        c_sq = 1 / codebook.norm(dim=1).clamp_min(1e-12)
    else:
        x_sq, c_sq = x.pow(2).sum(1), codebook.pow(2).sum(1)
    indices = torch.empty(n, dtype=torch.long, device=x.device)
    common = dict(BN=BLOCK_ROWS, BK=BLOCK_CODES, BD=BLOCK_DIMS)
    grid = (triton.cdiv(n, BLOCK_ROWS),)
    _nearest[grid](x, codebook, x_sq, c_sq, indices, n, k, d, cosine, **common)
    if anchor is None:
        return indices, None, None
    best = torch.empty(k, device=x.device)
    where = torch.empty(k, dtype=torch.long, device=x.device)
    seed = torch.randint(0, 2**31 - 2**20, (1,), generator=generator, device=x.device)
    grid = (triton.cdiv(k, BLOCK_CODES),)
    _anchor[grid](
        x,
        codebook,
        x_sq,
        c_sq,
        seed,
        best,
        where,
        n,
        k,
        d,
        cosine,
        anchor == "probabilistic",
        **common,
    )
    return indices, best, where
