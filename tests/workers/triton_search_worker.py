"""Run by tests/tokenizer/test_triton_search.py with TRITON_INTERPRET=1 (set before Triton is
imported): the fused kernels against the PyTorch path on the CPU; writes a JSON report."""

import json
import sys

import torch

from tokenizer.quantizers import triton_search
from tokenizer.quantizers.search import search_and_anchor

CASES = [(300, 70, 4), (130, 37, 40), (65, 129, 6), (5, 3, 2)]  # partial blocks everywhere


def main(out: str) -> None:
    report = {"cases": []}
    for distance in ("l2", "cosine"):
        for n, k, d in CASES:
            g = torch.Generator().manual_seed(n * k)
            x, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
            x[4] = x[1]  # a duplicate row: either may be an anchor (the same feature)
            reference = search_and_anchor(x, codebook, distance, "closest", kernel="torch")
            found = search_and_anchor(x, codebook, distance, "closest", kernel="triton")
            nearest = search_and_anchor(x, codebook, distance, kernel="triton")
            report["cases"].append(
                {
                    "case": [distance, n, k, d],
                    "indices": torch.equal(found.indices, reference.indices),
                    "indices_alone": torch.equal(nearest.indices, reference.indices),
                    "anchors": torch.equal(x[found.anchor_row], x[reference.anchor_row]),
                    "scores": (found.anchor_score - reference.anchor_score).abs().max().item(),
                }
            )
    # probabilistic: 20,000 identical codes, each an independent draw over three rows
    x, codebook = torch.tensor([[0.0], [1.0], [2.0]]), torch.zeros(20000, 1)
    found = search_and_anchor(
        x, codebook, "l2", "probabilistic", torch.Generator().manual_seed(0), kernel="triton"
    )
    report["frequencies"] = (torch.bincount(found.anchor_row, minlength=3) / 20000).tolist()
    report["expected"] = torch.softmax(-(x.flatten() ** 2), 0).tolist()
    report["interpreted"] = type(triton_search._nearest).__name__
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
