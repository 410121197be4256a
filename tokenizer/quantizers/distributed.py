"""The only cross-process communication of the quantizers.

Codebook updates that are not gradient steps (CVQ anchors, EMA) are invisible to DDP, so every
process must compute them from the same numbers: counts are summed over processes, and each anchor
is picked from candidates gathered from all processes by the same rule everywhere. With one
process (or no initialised process group) every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (in place, also returned)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_counts_and_pick_anchors(
    counts: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process has its code counts (K), and for each code an anchor candidate row (K×d)
    with a score (K). Returns, identically on every process and in one collective, the counts
    summed over the processes and the candidates with the highest score over all processes
    (ties go to the lowest rank)."""
    n = world_size()
    if n == 1:
        return counts, rows
    # float64 holds the counts and the float32 scores and rows exactly
    packed = torch.cat([counts[:, None], scores[:, None], rows], 1).double()
    every = [torch.empty_like(packed) for _ in range(n)]
    dist.all_gather(every, packed)
    stacked = torch.stack(every)  # P×K×(d+2)
    winner = stacked[:, :, 1].argmax(0)  # K
    best = stacked[winner, torch.arange(len(rows), device=rows.device), 2:]
    return stacked[:, :, 0].sum(0).to(counts.dtype), best.to(rows.dtype)
