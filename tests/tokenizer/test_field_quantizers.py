"""The field's collapse-free quantizers (issue 17): FSQ, LFQ and SimVQ equal
vector-quantize-pytorch's modules on the same input and weights (where its defaults differ from
the papers, set to the papers' formula); IBQ equals its formula written densely here; none forms
the N×K matrix."""

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.tokenizer.test_contrastive import LargestTensor
from tokenizer.quantizers import (
    FSQQuantizer,
    IBQQuantizer,
    LFQQuantizer,
    SimVQQuantizer,
    build_quantizer,
)
from tokenizer.quantizers.lfq import bit_groups
from tokenizer.quantizers.search import tile_shape

vqp = pytest.importorskip("vector_quantize_pytorch")  # the test extra installs it

FIELD = {
    "fsq": dict(levels=[8, 5, 5, 5]),
    "lfq": dict(code_dim=4),
    "simvq": dict(num_codes=32, code_dim=4),
    "ibq": dict(num_codes=32, code_dim=4),
}


def rows_to_map(rows, b, h, w):
    return rows.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def map_to_rows(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


# --- FSQ ------------------------------------------------------------------------------------------


def paper_fsq(levels):
    """vector-quantize-pytorch's FSQ with the paper's bound: (1 − ε) where it writes (1 + ε)."""
    oracle = vqp.FSQ(levels=levels)
    oracle.bound = functools.partial(oracle.bound, eps=-1e-3)
    return oracle


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 6, 5], [7, 5, 5, 5, 5]])
def test_fsq_equals_vector_quantize_pytorch_with_the_papers_bound(levels):
    torch.manual_seed(0)
    z = (torch.randn(4, len(levels), 6, 7) * 2).requires_grad_()
    ours = FSQQuantizer(levels=levels)
    out = ours(z)
    oracle_z = z.detach().clone().requires_grad_()
    expected, expected_indices = paper_fsq(levels)(oracle_z)
    assert ours.num_codes == math.prod(levels)
    assert torch.equal(out.indices, expected_indices.long())
    assert torch.equal(out.z_q, expected)
    assert out.loss == 0
    upstream = torch.randn_like(expected)
    out.z_q.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(z.grad, oracle_z.grad)
    # its default (1 + ε) gives the same set of codes with thresholds slightly moved
    default_out, _ = vqp.FSQ(levels=levels)(z.detach())
    assert set(default_out.unique().tolist()) <= set(expected.unique().tolist()) | {-1.0, 1.0}


def test_fsq_indices_are_mixed_radix_with_channel_0_least_significant():
    q = FSQQuantizer(levels=[8, 5, 5])
    # channel values chosen to round to the digits (7, 0, 3): round(bound) = digit − ⌊L/2⌋
    z_q = torch.tensor([3, -2, 1]) / torch.tensor([4, 2, 2])
    z = torch.atanh(z_q * 0.99).view(1, 3, 1, 1) * 1.5  # far inside each level's interval
    out = q(z)
    assert out.indices.item() == 7 + 0 * 8 + 3 * 40
    assert torch.equal(out.z_q.flatten(), z_q.float())


def test_fsq_uses_every_code_in_bf16_autocast():
    # bf16 cannot hold the integers above 256 that indices are: computed in bf16, about half
    # of [8, 5, 5, 5]'s 1,000 codes merge (vector-quantize-pytorch issue 114)
    torch.manual_seed(0)
    q = FSQQuantizer(levels=[8, 5, 5, 5])
    z = (torch.randn(64, 4, 40, 40) * 1.5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.z_q.dtype == torch.bfloat16
    assert (out.counts > 0).sum() == 1000
    assert torch.equal(out.indices, q(z.float()).indices)


def test_fsq_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"levels.*>= 3.*\[8, 2\]"):
        FSQQuantizer(levels=[8, 2])
    with pytest.raises(ValueError, match=r"code_dim.*len\(levels\) = 4.*6"):
        FSQQuantizer(levels=[8, 5, 5, 5], code_dim=6)
    with pytest.raises(ValueError, match=r"C=3 channels but code_dim=4"):
        FSQQuantizer(levels=[8, 5, 5, 5])(torch.randn(1, 3, 2, 2))


# --- LFQ ------------------------------------------------------------------------------------------


@pytest.fixture
def exact_log(monkeypatch):
    """vector-quantize-pytorch's entropy takes log(max(p, 1e-5)): the papers' −Σ p log p needs
    the exact log (a tiny clamp only keeps 0·log 0 = 0)."""
    import vector_quantize_pytorch.lookup_free_quantization as module

    monkeypatch.setattr(module, "log", lambda t, eps=1e-5: t.clamp(min=1e-38).log())


def reverse_bits(indices, bits):
    return sum(((indices >> i) & 1) << (bits - 1 - i) for i in range(bits))


@pytest.mark.parametrize("tile", [2**18, 7])  # the 2^d codes in one tile, or in chunks
def test_lfq_equals_vector_quantize_pytorch(exact_log, tile):
    torch.manual_seed(0)
    d, tau, beta, weight, gamma = 6, 0.05, 0.25, 0.1, 1.3
    z = (torch.randn(3, d, 5, 4) * 0.3).requires_grad_()
    ours = LFQQuantizer(
        code_dim=d,
        beta=beta,
        entropy_weight=weight,
        entropy_temperature=tau,
        batch_entropy_weight=gamma,
        max_search_bytes=4 * tile,
    )
    out = ours(z)
    oracle_z = z.detach().clone().requires_grad_()
    oracle = vqp.LFQ(
        dim=d,
        entropy_loss_weight=weight,
        commitment_loss_weight=beta,
        diversity_gamma=gamma,
    )
    (expected, indices, aux_loss), parts = oracle(
        oracle_z, inv_temperature=1 / tau, return_loss_breakdown=True
    )
    assert torch.equal(out.z_q, expected)
    # the paper's index: channel 0 the least significant bit; theirs: the most significant
    assert torch.equal(out.indices, reverse_bits(indices, d))
    assert set(out.z_q.unique().tolist()) == {-1.0, 1.0}
    sample, batch = ours.entropies(map_to_rows(z))
    torch.testing.assert_close(sample, parts.per_sample_entropy)
    torch.testing.assert_close(batch, parts.batch_entropy)
    torch.testing.assert_close(out.loss, aux_loss)
    torch.testing.assert_close(out.commitment_loss, parts.commitment)
    out.loss.backward()
    aux_loss.backward()
    torch.testing.assert_close(z.grad, oracle_z.grad, rtol=1e-4, atol=5e-5 * z.grad.abs().max())


def dense_group_entropy(rows, groups, tau):
    """Σ over the groups of bits of the entropy of the batch-mean softmax over the group's codes,
    on the whole N × 2^bits matrices."""
    total = 0
    for a, b in groups:
        codes = torch.tensor(
            [[1.0 if (s >> i) & 1 else -1.0 for i in range(b - a)] for s in range(2 ** (b - a))]
        )
        p = (2 * rows[:, a:b] @ codes.t() / tau).softmax(1).mean(0)
        total = total - (p * p.log()).sum()
    return total


def test_lfq_batch_entropy_over_groups_of_bits_equals_the_dense_formula():
    torch.manual_seed(0)
    rows = (torch.randn(300, 7) * 0.2).requires_grad_()
    q = LFQQuantizer(
        code_dim=7, entropy_temperature=0.1, entropy_group_bits=3, max_search_bytes=200
    )
    assert q.groups == [(0, 3), (3, 5), (5, 7)] == bit_groups(7, 3)
    sample, batch = q.entropies(rows)
    expected = dense_group_entropy(rows, q.groups, 0.1)
    torch.testing.assert_close(batch, expected)
    (grad,) = torch.autograd.grad(batch, rows)
    (expected_grad,) = torch.autograd.grad(expected, rows)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)
    # the per-row entropy factorises over the bits exactly: the joint over all 2^7 codes
    joint = dense_group_entropy(rows, [(0, 7)], 0.1)  # the batch term, for scale
    per_row = (
        2
        * rows
        @ torch.tensor([[1.0 if (s >> i) & 1 else -1.0 for i in range(7)] for s in range(128)]).t()
        / 0.1
    ).softmax(1)
    torch.testing.assert_close(sample, -(per_row * per_row.log()).sum(1).mean())
    assert batch >= joint - 1e-4  # the grouped estimate bounds the joint entropy from above
    assert bit_groups(18, 14) == [(0, 9), (9, 18)]


def test_lfq_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"code_dim.*\[1, 24\].*30"):
        LFQQuantizer(code_dim=30)
    with pytest.raises(ValueError, match="entropy_temperature must be > 0"):
        LFQQuantizer(entropy_temperature=0)


# --- SimVQ ----------------------------------------------------------------------------------------


def test_simvq_equals_vector_quantize_pytorch_without_rotation_trick():
    torch.manual_seed(0)
    k, d = 256, 8
    ours = SimVQQuantizer(num_codes=k, code_dim=d, codebook_seed=3)
    oracle = vqp.SimVQ(
        dim=d,
        codebook_size=k,
        codebook_transform=nn.Linear(d, d),  # the paper's code has a bias; theirs by default not
        rotation_trick=False,
        channel_first=True,
    )
    with torch.no_grad():
        oracle.frozen_codebook.copy_(ours.codebook)
        oracle.code_transform.load_state_dict(ours.projection.state_dict())
        codes = ours.codes()
    # features near codes (so that the nearest code is unambiguous in either's rounding) and
    # far from every code
    pick = torch.randint(0, k, (200,))
    rows = torch.cat([codes[pick] + 0.01 * torch.randn(200, d), torch.randn(40, d) * 3])
    z = rows_to_map(rows, 4, 6, 10).requires_grad_()
    out = ours(z)
    oracle_z = z.detach().clone().requires_grad_()
    expected, indices, loss = oracle(oracle_z)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.z_q, expected)
    torch.testing.assert_close(out.loss, loss)
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(ours.projection.weight.grad, oracle.code_transform.weight.grad)
    torch.testing.assert_close(ours.projection.bias.grad, oracle.code_transform.bias.grad)
    torch.testing.assert_close(z.grad, oracle_z.grad)
    assert ours.codebook.grad is None and "codebook" in dict(ours.named_buffers())


def test_simvq_codebook_is_frozen_seeded_and_saved():
    a, b = SimVQQuantizer(num_codes=64, code_dim=8), SimVQQuantizer(num_codes=64, code_dim=8)
    assert torch.equal(a.codebook, b.codebook)
    assert not torch.equal(
        a.codebook, SimVQQuantizer(num_codes=64, code_dim=8, codebook_seed=1).codebook
    )
    assert torch.allclose(a.codebook.std(), torch.tensor(8**-0.5), rtol=0.2)
    assert set(a.state_dict()) == {"codebook", "projection.weight", "projection.bias"}
    params = {name for name, p in a.named_parameters() if p.requires_grad}
    assert params == {"projection.weight", "projection.bias"}


# --- IBQ ------------------------------------------------------------------------------------------


def dense_ibq(rows, codebook, tau, beta=1.0, codebook_weight=0.25, entropy_weight=0.05):
    """IBQ's official forward and loss on the whole N×K matrix (IndexPropagationQuantize and
    its entropy loss, with the batch over these rows)."""
    logits = rows @ codebook.t()
    soft = logits.softmax(1)
    index = logits.argmax(1)
    hard = F.one_hot(index, len(codebook)).float()
    z_q = (hard - soft.detach() + soft) @ codebook
    chosen = codebook[index]
    quant = (
        F.mse_loss(z_q, rows)
        + beta * F.mse_loss(rows, chosen.detach())
        + codebook_weight * F.mse_loss(chosen, rows.detach())
    )
    p = (logits / tau).softmax(1)
    sample = -(p * (logits / tau).log_softmax(1)).sum(1).mean()
    mean = p.mean(0)
    batch = -(mean * mean.clamp(min=1e-30).log()).sum()
    return z_q, index, quant + entropy_weight * (sample - batch)


@pytest.mark.parametrize("tile", [2**18, 5, 200])  # one tile; chunks of codes; several rows
def test_ibq_equals_its_dense_formula(tile):
    torch.manual_seed(0)
    k, d, tau = 40, 6, 0.5
    ours = IBQQuantizer(num_codes=k, code_dim=d, entropy_temperature=tau, max_search_bytes=4 * tile)
    z = (torch.randn(3, d, 4, 5) * 0.5).requires_grad_()
    out = ours(z)
    codebook = ours.codebook.detach().clone().requires_grad_()
    rows = map_to_rows(z.detach()).requires_grad_()
    z_q, index, loss = dense_ibq(rows, codebook, tau)
    assert torch.equal(out.indices.flatten(), index)
    assert torch.equal(map_to_rows(out.z_q), codebook.detach()[index])  # exactly the chosen code
    torch.testing.assert_close(out.loss, loss)
    upstream = torch.randn_like(out.z_q)
    (out.loss + (out.z_q * upstream).sum()).backward()
    (loss + (z_q * map_to_rows(upstream)).sum()).backward()
    torch.testing.assert_close(map_to_rows(z.grad), rows.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.codebook.grad, codebook.grad, rtol=1e-4, atol=1e-6)
    # every code gets a gradient, the used ones and the others
    assert (ours.codebook.grad.abs().sum(1) > 0).all()


def test_ibq_gradient_to_z_goes_only_through_the_softmax():
    torch.manual_seed(0)
    q = IBQQuantizer(num_codes=16, code_dim=4).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(out.z_q)
    out.z_q.backward(upstream)
    assert not torch.allclose(z.grad, upstream)  # no identity path, unlike VQ


# --- all of them ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FIELD))
def test_decode_indices_reproduces_z_q_exactly_in_bf16_autocast(kind):
    torch.manual_seed(0)
    q = build_quantizer(kind, **FIELD[kind])
    z = torch.randn(3, 4, 5, 6)
    q(z)  # a training step's forward
    q.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        decoded = q.decode_indices(out.indices)
    reference = q(z.bfloat16().float())
    assert out.z_q.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices, reference.indices), "autocast changed the chosen codes"
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, reference.z_q)
    assert torch.equal(out.counts, torch.bincount(out.indices.flatten(), minlength=q.num_codes))


@pytest.mark.parametrize("kind", ["lfq", "ibq", "simvq"])
def test_no_n_by_k_matrix_forward_and_backward(kind):
    """At K = 4,096 codes and N = 600 rows, with a tile of 2,000 logits: no tensor holds more
    than a tile, the codes (K×d) or the rows."""
    torch.manual_seed(0)
    options = {"lfq": dict(code_dim=12, entropy_group_bits=12)}.get(
        kind, dict(num_codes=4096, code_dim=8)
    )
    q = build_quantizer(kind, max_search_bytes=8000, **options)
    z = torch.randn(6, options["code_dim"], 10, 10, requires_grad=True)
    with LargestTensor() as mode:
        out = q(z)
        (out.loss + out.z_q.sum()).backward()
    n, k, d = 600, 4096, options["code_dim"]
    # (the l2 search augments the codes to K×(d + 2))
    assert mode.largest <= max(2000, k * (d + 2), n * d), (mode.largest, n * k)
    assert tile_shape(n, k, 2000) == (64, 31)


@pytest.mark.parametrize("kind", list(FIELD))
def test_options_are_checked(kind):
    with pytest.raises(ValueError, match=rf"unknown option.*'colour'.*{kind}"):
        build_quantizer(kind, colour=1, **FIELD[kind])
    with pytest.raises(ValueError, match="distance|unknown option"):
        build_quantizer(kind, distance="manhattan", **FIELD[kind])
