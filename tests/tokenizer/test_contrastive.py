"""Issue 15: CVQ's contrastive loss (CVQ-VAE Tab. 3 E) in chunks of codes, never the N×K
similarity matrix, equal to the dense formula."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tokenizer.quantizers import ClusteredQuantizer
from tokenizer.quantizers.cvq import CONTRASTIVE_TILES


def dense_reference(rows, codes, distance, temperature=0.07):
    """The official formula on the full N×K matrix: positive = mean of each code's N/K most
    similar features, negatives = its least similar half."""
    n, k = len(rows), len(codes)
    if distance == "cosine":
        sim = F.normalize(rows, dim=1) @ F.normalize(codes, dim=1).t()
    else:
        sim = -torch.cdist(rows, codes).pow(2)
    ordered = sim.sort(dim=0).values
    positive = ordered[-max(1, n // k) :].mean(0, keepdim=True)
    negatives = ordered[: n // 2]
    logits = torch.cat([positive, negatives]).t() / temperature
    return F.cross_entropy(logits, torch.zeros(k, dtype=torch.long))


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("tile", [1, 2**18])  # tiles of scores: chunks of 1 code, all at once
def test_chunked_loss_and_gradient_equal_the_dense_formula(distance, tile):
    torch.manual_seed(0)
    q = ClusteredQuantizer(
        num_codes=16,
        code_dim=8,
        distance=distance,
        contrastive_weight=1.0,
        max_search_bytes=4 * tile,
    )
    with torch.no_grad():
        q.codebook.normal_()
    rows = torch.randn(200, 8)
    loss = q._contrastive_loss(rows)
    (grad,) = torch.autograd.grad(loss, q.codebook)
    codes = q.codebook.detach().clone().requires_grad_()
    expected = dense_reference(rows, codes, distance)
    (expected_grad,) = torch.autograd.grad(expected, codes)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_memory_does_not_grow_with_the_codes():
    tile, n = 4096 // CONTRASTIVE_TILES, 1000
    q = ClusteredQuantizer(num_codes=512, code_dim=8, contrastive_weight=1.0)
    q.max_search_bytes = 4 * tile
    rows = torch.randn(n, 8)
    with LargestTensor() as mode:
        q._contrastive_loss(rows).backward()
    # the N×K similarities would be 512,000 elements; a chunk holds at most one tile of them,
    # the largest other tensor is a copy of the rows (N×d)
    assert mode.largest <= max(CONTRASTIVE_TILES * tile, rows.numel()), mode.largest
