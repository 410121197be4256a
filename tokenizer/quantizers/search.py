"""Nearest-code search fused with the CVQ anchor draw, in tiles sized for the device.

The N×K score matrix is never materialised: it is computed in tiles of ``rows × codes`` scores
of at most a memory budget (:func:`search_budget`: 1 MiB on the CPU, where a tile stays in a
core's cache; 256 MiB on a GPU, where few large kernels beat many small ones), the whole
codebook per tile when the budget leaves at least ``MIN_TILE_ROWS`` rows, else chunks of codes
with a running best per row across them. One pass over the tiles gives every vector's nearest
code and, from the same tile of scores, each code's anchor candidate (CVQ-VAE Sec. 3.2):

- "closest": a running maximum per code over the tiles; when a tile improves it for some
  codes, their rows in that tile are found from the tile's scores (an argmax over the few
  improved columns, so no second pass and no per-row work for the others);
- "probabilistic" (row i drawn with probability softmax_i(score_ik)): an exact two-level
  Gumbel-max draw. Per tile and code, log Σ_i exp(score_ik) plus a Gumbel variable; the running
  maximum of these over the tiles picks a tile with probability proportional to its mass, and
  whenever a tile takes the lead for a code, a Gumbel-max over that tile's rows draws the row
  (independently of how the tile was chosen, so the pair is an exact draw). Random numbers: one
  per tile and code, plus one per row for each change of lead (about K·ln(tiles) columns),
  never N×K. The returned score, the maximum of (log-mass + Gumbel), is itself a Gumbel-max
  value of the whole set, so maxima across processes stay an exact draw.

Memory besides the inputs and outputs: a few tiles of scores and O(K) running values,
whatever N.
Ties: among equal scores the first index wins (the lowest code for a row; the first row for a
code), as ``argmax`` on the dense matrix does. When a tile has more codes than rows it is
computed codes×rows (a tall product is several times faster on the CPU); the same vector at
two positions of such a tile can then round differently in the last bit, so among identical
features any one may be a code's anchor (the anchor itself is the same).

Scores are similarities (higher is closer): cosine similarity for ``"cosine"``, the negative
squared Euclidean distance for ``"l2"``. Callers pass float32 tensors.
"""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DISTANCES = ("l2", "cosine")
ANCHORED = (None, "closest", "probabilistic")

# bytes of float32 scores per tile: 1 MiB stays in a core's L2 cache; on a GPU a tile is a
# kernel launch or several, and 256 MiB makes even 2 million rows × 1,024 codes 32 tiles
DEFAULT_SEARCH_BYTES = {"cpu": 2**20}
DEVICE_SEARCH_BYTES = 2**28
# a tile takes the whole codebook if that leaves at least this many rows, else chunks of codes
MIN_TILE_ROWS = 64
# codes per block of the two-level argmax on the CPU
BLOCK = 32


def search_budget(device: torch.device, max_bytes: int | None = None) -> int:
    """Scores (float32 elements) per tile: ``max_bytes``, or the device's default."""
    if max_bytes is None:
        max_bytes = DEFAULT_SEARCH_BYTES.get(device.type, DEVICE_SEARCH_BYTES)
    return max(1, max_bytes // 4)


def tile_shape(n: int, k: int, elements: int) -> tuple[int, int]:
    """(rows, codes) of a tile of at most ``elements`` scores (at least 1×1): the whole codebook
    when that leaves ``MIN_TILE_ROWS`` rows (or all of them), else chunks of codes."""
    if k * min(n, MIN_TILE_ROWS) <= elements:
        return max(1, min(n, elements // max(k, 1))), k
    rows = max(1, min(n, MIN_TILE_ROWS, elements))
    return rows, max(1, min(k, elements // rows))


def tiles_per_search(n: int, k: int, elements: int) -> int:
    """How many tiles a search of ``n`` rows among ``k`` codes takes."""
    rows, codes = tile_shape(n, k, elements)
    return -(-n // rows) * -(-k // codes)


@dataclass
class Search:
    """``indices``: each row's nearest code (N). ``anchor_score`` / ``anchor_row``: per code,
    the score of its anchor candidate (the Gumbel-max value for "probabilistic") and the row
    (K each); None without anchors."""

    indices: torch.Tensor
    anchor_score: torch.Tensor | None = None
    anchor_row: torch.Tensor | None = None


def _rows(x: torch.Tensor, distance: str) -> torch.Tensor:
    """A tile's row operand: for cosine the normalised vectors; for l2 the augmented
    [2x, −‖x‖², 1], whose product with :func:`_codes`' [e, 1, −‖e‖²] is
    2x·e − ‖x‖² − ‖e‖² = −‖x − e‖² in one matrix product. Built per tile: no copy of all N."""
    if distance == "cosine":
        return F.normalize(x, dim=1)
    return torch.cat([2 * x, -x.pow(2).sum(1, keepdim=True), x.new_ones(len(x), 1)], 1)


def _codes(codebook: torch.Tensor, distance: str) -> torch.Tensor:
    """The code operand (K×d'), see :func:`_rows`."""
    if distance == "cosine":
        return F.normalize(codebook, dim=1)
    ones = codebook.new_ones(len(codebook), 1)
    return torch.cat([codebook, ones, -codebook.pow(2).sum(1, keepdim=True)], 1)


def _first_argmax(s: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``s.argmax(dim)`` of a 2-D tile (the first index on ties), into ``out`` if given. On the
    CPU, where torch's argmax is not vectorised but its ``amax`` is (~10× faster per element),
    in two levels: the first block of ``BLOCK`` entries holding the maximum, then the first
    maximum within it: 2-3× faster at 256 … 1024 codes, and exactly the same index."""
    k = s.shape[dim]
    if s.device.type != "cpu" or k % BLOCK or k < 4 * BLOCK:
        return torch.argmax(s, dim, out=out)
    if out is not None:
        return out.copy_(_first_argmax(s, dim))
    if dim == 1:
        blocks = s.view(len(s), k // BLOCK, BLOCK)
        block = blocks.amax(2).argmax(1)
        return block * BLOCK + blocks[torch.arange(len(s)), block].argmax(1)
    blocks = s.view(k // BLOCK, BLOCK, s.shape[1])
    block = blocks.amax(1).argmax(0)
    return block * BLOCK + blocks[block, :, torch.arange(s.shape[1])].argmax(1)


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log(-torch.log(u.clamp_(min=1e-20)))


@contextmanager
def _exact_float32(device: torch.device):
    """Float32 products without TF32 on CUDA (``train.allow_tf32`` turns it on for the rest of
    the model): TF32 would round the scores and pick other codes."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@functools.cache
def triton_kernels():
    """:mod:`.triton_search`, or None where it cannot run: no Triton, or this code travelling
    alone as an exported tokenizer's model.py (then the PyTorch path searches). A string import,
    so that neither Triton nor that module is a requirement of the exported file."""
    try:
        return importlib.import_module(f"{__package__}.triton_search")
    except ImportError:
        return None


def use_triton(x: torch.Tensor) -> bool:
    """Whether the search of ``x`` runs the Triton kernels by default: on CUDA, where Triton
    is installed."""
    return x.is_cuda and triton_kernels() is not None


@torch.no_grad()
def search_and_anchor(
    x: torch.Tensor,
    codebook: torch.Tensor,
    distance: str = "l2",
    anchor: str | None = None,
    generator: torch.Generator | None = None,
    max_bytes: int | None = None,
    sync_free: bool | None = None,
    kernel: str | None = None,
) -> Search:
    """Every row's nearest code in ``codebook`` (Eq. 2 of CVQ-VAE) and, with ``anchor``
    ("closest" or "probabilistic"), every code's anchor candidate, in one pass over tiles of at
    most ``max_bytes`` of scores (default: :func:`search_budget`'s for the device; see the
    module docstring). ``sync_free`` (default: on any device but the CPU) finds the anchor
    candidates without asking the host which codes a tile improved (a wait for the device per
    tile on a GPU), in a few operators per tile: for every code in every tile the closest row,
    or for "probabilistic" the row of the largest score + Gumbel noise (a noise value per score
    of the tile: an exact draw, and its maximum a Gumbel-max value as above). ``kernel``:
    "triton" (the fused kernels of :mod:`.triton_search`: two launches, no
    tile of scores in memory), "torch" (the tiles here), or None: Triton on a CUDA device where
    it is installed, else torch."""
    if anchor not in ANCHORED:
        raise ValueError(f"anchor must be one of {ANCHORED}, got {anchor!r}")
    if kernel is None:
        kernel = "triton" if use_triton(x) else "torch"
    if kernel == "triton":
        with _exact_float32(x.device):
            return Search(
                *triton_kernels().search_and_anchor(x, codebook, distance, anchor, generator)
            )
    sync_free = x.device.type != "cpu" if sync_free is None else sync_free
    elements = search_budget(x.device, max_bytes)
    with _exact_float32(x.device):
        return _search(x, codebook, distance, anchor, generator, elements, sync_free)


def _search(x, codebook, distance, anchor, generator, elements, sync_free) -> Search:
    n, k, device = len(x), len(codebook), x.device
    step, width = tile_shape(n, k, elements)
    # a matrix product with a tall output runs several times faster on the CPU than its
    # transpose: with more codes than rows in a tile, tiles are codes×rows (codes along dim 0)
    by_code = width > step
    codes = _codes(codebook, distance)  # K×d'
    codes = codes if by_code else codes.t().contiguous()
    along_rows = 1 if by_code else 0  # the tile's dimension of rows
    indices = torch.empty(n, dtype=torch.long, device=device)
    best = torch.full((k,), float("-inf"), device=device)
    where = torch.zeros(k, dtype=torch.long, device=device)
    shape = (width, step) if by_code else (step, width)
    scores = torch.empty(shape, device=device)
    mass = torch.empty(shape, device=device) if anchor == "probabilistic" else None
    chunks = [(c0, min(c0 + width, k)) for c0 in range(0, k, width)]
    # the rows' operand at once when it fits in a tile's budget (fewer operators), else per tile
    operand = _rows(x, distance) if n * (x.shape[1] + 2) <= elements else None
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = _rows(x[start:stop], distance) if operand is None else operand[start:stop]
        row_best = row_code = None  # running over the chunks of codes
        for c0, c1 in chunks:
            whole = stop - start == step and c1 - c0 == width  # out= for whole tiles only
            if by_code:
                s = torch.mm(codes[c0:c1], rows.t(), out=scores if whole else None)
            else:
                s = torch.mm(rows, codes[:, c0:c1], out=scores if whole else None)
            if len(chunks) == 1:  # into its place: no copy
                _first_argmax(s, 1 - along_rows, out=indices[start:stop])
            else:  # strictly better: an earlier chunk keeps a tie (the lowest code wins)
                nearest = _first_argmax(s, 1 - along_rows)
                value = s.amax(1 - along_rows)
                if row_best is None:
                    row_best, row_code = value, nearest + c0
                else:
                    lead = value > row_best
                    row_code = torch.where(lead, nearest + c0, row_code)
                    row_best = torch.where(lead, value, row_best)
            if anchor is not None:
                _anchors(
                    s,
                    along_rows,
                    anchor,
                    distance,
                    start,
                    stop,
                    best[c0:c1],
                    where[c0:c1],
                    mass,
                    generator,
                    sync_free,
                )
        if len(chunks) > 1:
            indices[start:stop] = row_code
    if anchor is None:
        return Search(indices)
    return Search(indices, best, where)


def _anchors(
    s, along_rows, anchor, distance, start, stop, best, where, mass, generator, sync_free
) -> None:
    """Update the anchor candidates (``best``, ``where``: views of these codes' running values)
    from a tile of scores ``s`` of rows ``start:stop``."""
    k, device = s.shape[1 - along_rows], s.device
    if sync_free:  # every code's best row in this tile, kept where the tile leads
        if anchor == "probabilistic":  # + Gumbel noise, −log Exp(1): an exact draw per code
            s = s.sub_(torch.empty_like(s).exponential_(generator=generator).log_())
        value, row = s.max(along_rows)  # the first row on ties
        lead = value > best
        where.copy_(torch.where(lead, row + start, where))
        best.copy_(torch.where(lead, value, best))
        return
    if anchor == "closest":
        value = s.amax(along_rows)
    else:  # the tile's log-mass per code plus Gumbel noise: a Gumbel-max over tiles
        top = s.amax(along_rows) if distance == "l2" else s.new_zeros(k)  # cosine: |s| <= 1
        out = mass if s.shape == mass.shape else None
        e = torch.sub(s, top.unsqueeze(along_rows), out=out).exp_()
        value = e.sum(along_rows).log_().add_(top).add_(_gumbel(k, generator, device))
    # the codes whose candidate is now in this tile: their row within it (for "probabilistic"
    # a Gumbel-max draw in the tile, independent of the tile's selection)
    better = (value > best).nonzero().flatten()
    if len(better):
        column = s.index_select(1 - along_rows, better)
        if anchor == "probabilistic":
            column += _gumbel(column.shape, generator, device)
        where[better] = column.argmax(along_rows) + start
        best[better] = value[better]


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    distance: str = "l2",
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Index of the closest code for every row of ``x`` (N×d) in ``codebook`` (K×d): a long
    tensor of length N."""
    return search_and_anchor(x, codebook, distance, max_bytes=max_bytes).indices
