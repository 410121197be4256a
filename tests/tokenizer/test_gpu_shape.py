"""Issue 20: what the CPU can prove about the GPU path (the meta device runs an accelerator's
code path without computing): tile counts and operator launches at the recipes' real sizes;
and, where a GPU is, the Triton kernels and every quantizer on it (``-m cuda``)."""

import pytest
import torch

from benchmarks.launches import SETTINGS, quantizer_launches
from tokenizer.quantizers import build_quantizer
from tokenizer.quantizers.search import search_and_anchor, triton_kernels


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_few_large_tiles_and_few_launches_at_the_recipes_sizes(setting):
    what, kind, options, shape, _ = setting
    launches, tiles = quantizer_launches(kind, options, shape, triton=False)
    assert tiles is None or tiles <= 64, (what, tiles)
    if what == "LooC, FFHQ f16 (the paper's)":  # 2 million rows × 1,024 codes, probabilistic
        assert launches <= 500
        fused, _ = quantizer_launches(kind, options, shape, triton=True)
        assert triton_kernels() is None or fused < 100


@pytest.mark.cuda
@pytest.mark.skipif(triton_kernels() is None, reason="needs Triton")
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("anchor", [None, "closest", "probabilistic"])
def test_cuda_triton_kernels_equal_the_pytorch_tiles(distance, anchor):
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(70_000, 4, generator=g), torch.randn(1024, 4, generator=g)
    x, codebook = x.cuda(), codebook.cuda()
    found = search_and_anchor(x, codebook, distance, anchor, kernel="triton")
    tiles = search_and_anchor(x, codebook, distance, anchor, kernel="torch")
    assert (found.indices == tiles.indices).float().mean() > 0.9999  # a last-bit tie at most
    if anchor == "closest":
        assert torch.equal(x[found.anchor_row], x[tiles.anchor_row])


@pytest.mark.cuda
@pytest.mark.parametrize(
    "kind, options",
    [
        ("looc", dict(num_codes=1024, code_dim=4)),
        ("cvq", dict(num_codes=16384, code_dim=4, anchor="closest")),
        ("simvq", dict(num_codes=65536, code_dim=8)),
        ("ibq", dict(num_codes=16384, code_dim=8)),
        ("lfq", dict(code_dim=18)),
        ("fsq", dict(levels=[8, 8, 8, 5, 5, 5])),
    ],
)
def test_cuda_every_kind_in_bf16(kind, options):
    torch.manual_seed(0)
    q = build_quantizer(kind, **options).cuda().train()
    channels = {"looc": 16, "fsq": 6}.get(kind, options.get("code_dim"))
    z = torch.randn(8, channels, 16, 16, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = q(z.bfloat16())
    (out.z_q.float().pow(2).mean() + out.loss).backward()
    assert torch.isfinite(z.grad).all() and out.z_q.dtype == torch.bfloat16
    q.eval()
    with torch.no_grad():
        out = q(z)
    assert torch.equal(q.decode_indices(out.indices), out.z_q)
