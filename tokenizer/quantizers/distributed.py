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


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (in place, also returned)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def pick_best_across_processes(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Every process proposes, for each of K codes, a candidate row (K×d) with a score (K).
    Returns, identically on every process, the candidate with the highest score over all
    processes (ties go to the lowest rank)."""
    n = world_size()
    if n == 1:
        return rows
    all_scores = [torch.empty_like(scores) for _ in range(n)]
    all_rows = [torch.empty_like(rows) for _ in range(n)]
    dist.all_gather(all_scores, scores.contiguous())
    dist.all_gather(all_rows, rows.contiguous())
    winner = torch.stack(all_scores).argmax(0)  # K
    stacked = torch.stack(all_rows)  # P×K×d
    return stacked[winner, torch.arange(rows.shape[0], device=rows.device)]
