"""LooC's two segment layouts ("channel", "unshuffle") and two straight-through estimators
("identity", "interpolated"), checked by hand and against a re-implementation of the official
code's forward pass (up-sample, pixel-unshuffle, quantize, pixel-shuffle, pool)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizers import LooCQuantizer

COMBOS = list(itertools.product(("channel", "unshuffle"), ("identity", "interpolated")))


def looc(**options):
    return LooCQuantizer(**{"num_codes": 16, "code_dim": 4, "interp_scale": 2, **options})


def ramp():
    """1×2×2×2: channel 0 is 8i + 4j, channel 1 is 1. Bilinear up-sampling by 2
    (align_corners=False) of a linear map is linear inside and clamped at the border:
    channel 0 becomes R[i] + S[j] with R = [0, 2, 6, 8], S = [0, 1, 3, 4]."""
    return torch.tensor([[[[0.0, 4.0], [8.0, 12.0]], [[1.0, 1.0], [1.0, 1.0]]]])


UP0 = [[0.0, 1.0, 3.0, 4.0], [2.0, 3.0, 5.0, 6.0], [6.0, 7.0, 9.0, 10.0], [8.0, 9.0, 11.0, 12.0]]


def test_ramp_upsamples_as_written_in_the_hand_computations():
    up = F.interpolate(ramp(), scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.equal(up[0, 0], torch.tensor(UP0))
    assert torch.equal(up[0, 1], torch.ones(4, 4))


# --- segments by hand -------------------------------------------------------------------------


def test_channel_layout_rows_by_hand():
    rows = looc(code_dim=2)._to_rows(ramp())
    # one row per up-sampled position (i, j), row-major: (channel 0, channel 1) there
    expected = [[v, 1.0] for line in UP0 for v in line]
    assert torch.equal(rows, torch.tensor(expected))


def test_unshuffle_layout_rows_by_hand_d4_is_one_channels_2x2_block():
    rows = looc(code_dim=4, segment_layout="unshuffle")._to_rows(ramp())
    ones = [1.0, 1.0, 1.0, 1.0]
    expected = [
        [0.0, 1.0, 2.0, 3.0], ones,  # (h, w) = (0, 0): channel 0's block, channel 1's block
        [3.0, 4.0, 5.0, 6.0], ones,  # (0, 1)
        [6.0, 7.0, 8.0, 9.0], ones,  # (1, 0)
        [9.0, 10.0, 11.0, 12.0], ones,  # (1, 1)
    ]  # fmt: skip
    assert torch.equal(rows, torch.tensor(expected))


def test_unshuffle_layout_rows_by_hand_d2_is_one_row_of_a_block():
    rows = looc(code_dim=2, segment_layout="unshuffle")._to_rows(ramp())
    # at (0, 0): channel 0 block row 0, block row 1, then channel 1's two block rows
    assert torch.equal(rows[:4], torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 1.0], [1.0, 1.0]]))
    # at (1, 1): the block of up-sampled rows 2-3, columns 2-3
    assert torch.equal(rows[12:14], torch.tensor([[9.0, 10.0], [11.0, 12.0]]))
    assert rows.shape == (16, 2)


def test_unshuffle_layout_rows_by_hand_d8_spans_two_channels():
    rows = looc(code_dim=8, segment_layout="unshuffle")._to_rows(ramp())
    assert torch.equal(rows[1], torch.tensor([3.0, 4.0, 5.0, 6.0, 1.0, 1.0, 1.0, 1.0]))
    assert rows.shape == (4, 8)


def test_channel_layout_indices_and_z_q_by_hand():
    q = looc(code_dim=2, num_codes=3, distance="l2").eval()
    q.codebook.data.copy_(torch.tensor([[0.0, 1.0], [5.0, 1.0], [10.0, 1.0]]))
    out = q(ramp())
    # nearest of 0, 5, 10 to each up-sampled channel-0 value (no ties: all values are integers)
    expected = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 2, 2], [2, 2, 2, 2]])
    assert torch.equal(out.indices, expected.view(1, 4, 4, 1))
    # z_q: 2×2 means of the codes' channel 0; channel 1 stays 1
    z_q = torch.tensor([[[[1.25, 5.0], [7.5, 10.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    assert torch.equal(out.z_q, z_q)


def test_unshuffle_layout_indices_and_z_q_by_hand():
    q = looc(code_dim=4, num_codes=5, distance="l2", segment_layout="unshuffle").eval()
    codes = [[1.0] * 4, [0.0, 1, 2, 3], [3.0, 4, 5, 6], [6.0, 7, 8, 9], [9.0, 10, 11, 12]]
    q.codebook.data.copy_(torch.tensor(codes))
    out = q(ramp())
    # B × H × W × β²·C/d* = 1×2×2×2: [b, h, w, t], t = channel here (d* = β²)
    assert torch.equal(out.indices, torch.tensor([[[[1, 0], [2, 0]], [[3, 0], [4, 0]]]]))
    # every segment is exact, so z_q = avgpool(upsample(z)): block means of channel 0
    z_q = torch.tensor([[[[1.5, 4.5], [7.5, 10.5]], [[1.0, 1.0], [1.0, 1.0]]]])
    assert torch.equal(out.z_q, z_q)


@pytest.mark.parametrize("scale, channels, d", [(2, 3, 6), (2, 4, 8), (3, 2, 6), (2, 2, 1)])
def test_unshuffle_index_layout_formula(scale, channels, d):
    """The documented formula: entry [b, h, w, t] is the code of entries t·d* … (t+1)·d* − 1 of
    the unshuffled vector, entry k being channel k // β² at (β·h + (k % β²) // β, β·w + k % β)."""
    torch.manual_seed(0)
    q = looc(code_dim=d, interp_scale=scale, distance="l2", segment_layout="unshuffle").eval()
    b, h, w = 2, 3, 2
    z = torch.randn(b, channels, h, w)
    out = q(z)
    s2 = scale * scale
    assert out.indices.shape == (b, h, w, s2 * channels // d)
    up = F.interpolate(z, scale_factor=scale, mode="bilinear", align_corners=False)
    for bb, hh, ww, t in itertools.product(*(range(n) for n in out.indices.shape)):
        ks = range(t * d, (t + 1) * d)
        segment = torch.stack(
            [up[bb, k // s2, scale * hh + (k % s2) // scale, scale * ww + k % scale] for k in ks]
        )
        expected = ((q.codebook - segment) ** 2).sum(1).argmin()
        assert out.indices[bb, hh, ww, t] == expected


# --- gradients --------------------------------------------------------------------------------


def pool_up(z, scale=2):
    up = F.interpolate(z, scale_factor=scale, mode="bilinear", align_corners=False)
    return F.avg_pool2d(up, scale)


@pytest.mark.parametrize("layout", ["channel", "unshuffle"])
def test_identity_straight_through_gradient(layout):
    torch.manual_seed(0)
    q = looc(code_dim=4, segment_layout=layout, straight_through="identity")
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    upstream = torch.randn(2, 8, 3, 5)
    q(z).z_q.backward(upstream)
    assert torch.equal(z.grad, upstream)


@pytest.mark.parametrize("layout", ["channel", "unshuffle"])
@pytest.mark.parametrize("scale", [2, 3])
def test_interpolated_straight_through_gradient_is_that_of_pool_of_upsample(layout, scale):
    torch.manual_seed(0)
    q = looc(code_dim=4, interp_scale=scale, segment_layout=layout, straight_through="interpolated")
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    upstream = torch.randn(2, 8, 3, 5)
    q(z).z_q.backward(upstream)
    zz = z.detach().clone().requires_grad_(True)
    pool_up(zz, scale).backward(upstream)
    assert torch.equal(z.grad, zz.grad)
    assert not torch.allclose(z.grad, upstream)  # not the identity


def test_interpolated_gradient_by_hand():
    """dz_q = one-hot at (0, 0) of a 2×2 map: avgpoolᵀ gives 1/4 to up-sampled (0..1, 0..1);
    bilinearᵀ: up-sampled index 0 comes from input 0 with weight 1, index 1 from inputs 0, 1
    with 0.75, 0.25; so per axis the weights are (1.75, 0.25) and dz = (1/4)·outer product."""
    q = looc(code_dim=1, num_codes=4, straight_through="interpolated")
    z = torch.randn(1, 1, 2, 2, requires_grad=True)
    upstream = torch.zeros(1, 1, 2, 2)
    upstream[0, 0, 0, 0] = 1
    q(z).z_q.backward(upstream)
    expected = torch.tensor([[0.765625, 0.109375], [0.109375, 0.015625]])
    assert torch.equal(z.grad[0, 0], expected)


# --- decode_indices ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout, straight", COMBOS)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_decode_indices_is_bit_identical_to_z_q(layout, straight, distance, scale):
    torch.manual_seed(0)
    q = looc(
        interp_scale=scale, distance=distance, segment_layout=layout, straight_through=straight
    ).eval()
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    out = q(z)
    assert torch.equal(q.decode_indices(out.indices), out.z_q)
    assert out.z_q.shape == z.shape


# --- the official code's forward pass, re-implemented -----------------------------------------


def official(z, codebook, beta, distance, scale, d, usage=None, decay=0.99, eps=1e-3):
    """The official forward pass as described: up-sample, pixel-unshuffle, cut each position's
    β²·C-vector into d-segments, nearest code, straight-through on the unshuffled map, pixel-
    shuffle, average-pool. With ``usage``, also the CVQ update with "closest" anchors."""
    up = F.interpolate(z, scale_factor=scale, mode="bilinear", align_corners=False)
    u = F.pixel_unshuffle(up, scale).permute(0, 2, 3, 1)  # b h w β²c
    flat = u.reshape(-1, d)
    x, e = flat.detach(), codebook.detach()
    if distance == "l2":
        scores = -(x**2).sum(1, keepdim=True) - (e**2).sum(1) + 2 * x @ e.t()
    else:
        scores = F.normalize(x, dim=1) @ F.normalize(e, dim=1).t()
    idx = scores.argmax(1)
    qu = codebook[idx].view(u.shape)
    loss = beta * torch.mean((qu.detach() - u) ** 2) + torch.mean((qu - u.detach()) ** 2)
    z_q = u + (qu - u).detach()
    z_q = F.avg_pool2d(F.pixel_shuffle(z_q.permute(0, 3, 1, 2), scale), scale)
    new_codebook = None
    if usage is not None:
        k = len(codebook)
        counts = torch.bincount(idx, minlength=k).float()
        usage = decay * usage + (1 - decay) * counts / counts.sum()
        alpha = torch.exp(-usage * k * 10 / (1 - decay) - eps).unsqueeze(1)
        anchors = x[scores.argmax(0)]
        new_codebook = e * (1 - alpha) + anchors * alpha
    b, _, h, w = z.shape
    return z_q, loss, idx.view(b, h, w, -1), new_codebook


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("scale, d", [(2, 4), (2, 2), (2, 8), (3, 6)])
def test_matches_official_forward_backward_and_update(distance, train, scale, d):
    torch.manual_seed(0)
    q = LooCQuantizer(
        num_codes=16,
        code_dim=d,
        interp_scale=scale,
        distance=distance,
        anchor="closest",
        segment_layout="unshuffle",
        straight_through="interpolated",
    ).train(train)
    codebook = q.codebook.detach().clone().requires_grad_(True)
    z = (torch.randn(2, 8, 3, 4) + 1).requires_grad_(True)
    zz = z.detach().clone().requires_grad_(True)
    upstream = torch.randn(2, 8, 3, 4)

    out = q(z)
    ref_z_q, ref_loss, ref_indices, ref_codebook = official(
        zz, codebook, q.beta, distance, scale, d, usage=torch.zeros(16) if train else None
    )
    assert torch.equal(out.indices, ref_indices)
    # the official value is pool(z_up + (q − z_up)), ours pool(q): equal up to rounding
    torch.testing.assert_close(out.z_q, ref_z_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=0)
    # the straight-through gradient alone is exactly the same
    (gz,) = torch.autograd.grad(out.z_q, z, upstream, retain_graph=True)
    (ref_gz,) = torch.autograd.grad(ref_z_q, zz, upstream, retain_graph=True)
    assert torch.equal(gz, ref_gz)
    # and together with the losses' gradients (to z and to the codebook)
    ((out.z_q * upstream).sum() + out.loss).backward()
    ((ref_z_q * upstream).sum() + ref_loss).backward()
    torch.testing.assert_close(z.grad, zz.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.codebook.grad, codebook.grad, rtol=1e-5, atol=1e-7)
    assert q.codebook.grad.abs().sum() > 0
    if train:
        torch.testing.assert_close(q.codebook.detach(), ref_codebook, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(q.codebook.detach(), codebook.detach())  # it did move
    else:
        assert torch.equal(q.codebook.detach(), codebook.detach())


def test_channel_layout_differs_from_official_at_beta_2():
    """The guard of the test above: the default layout and gradient are not the official ones."""
    torch.manual_seed(0)
    z = torch.randn(2, 8, 3, 4, requires_grad=True)
    q = looc(code_dim=4, distance="l2").eval()
    out = q(z)
    ref_z_q, _, ref_indices, _ = official(z, q.codebook, q.beta, "l2", 2, 4)
    assert out.indices.shape != ref_indices.shape
    assert not torch.allclose(out.z_q, ref_z_q, atol=1e-3)


# --- β = 1, defaults, options -----------------------------------------------------------------


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_beta_1_makes_all_four_combinations_identical(distance):
    z = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(0)) + 1
    upstream = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(1))
    results = []
    for layout, straight in COMBOS:
        torch.manual_seed(0)
        q = looc(
            interp_scale=1,
            distance=distance,
            anchor="closest",
            segment_layout=layout,
            straight_through=straight,
        )
        zz = z.clone().requires_grad_(True)
        out = q(zz)
        ((out.z_q * upstream).sum() + out.loss).backward()
        results.append((out.z_q, out.loss, out.indices, zz.grad, q.codebook.grad, q.codebook))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    assert results[0][2].shape == (2, 3, 4, 2)


def test_defaults_are_channel_and_identity():
    q = LooCQuantizer()
    assert (q.segment_layout, q.straight_through) == ("channel", "identity")
    assert "segment_layout='channel'" in repr(q)
    assert "straight_through='identity'" in repr(q)
    r = repr(looc(segment_layout="unshuffle", straight_through="interpolated"))
    assert "segment_layout='unshuffle'" in r and "straight_through='interpolated'" in r


@pytest.mark.parametrize("option", ["segment_layout", "straight_through"])
@pytest.mark.parametrize("value", ["official", None, ""])
def test_bad_option_values_are_refused(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be one of .*got {value!r}"):
        looc(**{option: value})


def test_unshuffle_needs_d_to_divide_beta2_c_not_c():
    # C = 3, d* = 6: refused by "channel", accepted by "unshuffle" (β²·C = 12)
    with pytest.raises(ValueError, match=r"C=3.*d\*=6"):
        looc(code_dim=6, in_channels=3)
    q = looc(code_dim=6, in_channels=3, segment_layout="unshuffle")
    assert q(torch.randn(1, 3, 2, 2)).indices.shape == (1, 2, 2, 2)
    # C = 3, d* = 8: β²·C = 12 is not divisible by 8
    with pytest.raises(ValueError, match=r"segment_layout='unshuffle'.*12.*C=3.*d\*=8"):
        looc(code_dim=8, in_channels=3, segment_layout="unshuffle")
    q = looc(code_dim=8, segment_layout="unshuffle")
    with pytest.raises(ValueError, match=r"C=3.*d\*=8"):
        q(torch.randn(1, 3, 2, 2))
    # with β = 1 "unshuffle" is "channel", so d* must divide C
    with pytest.raises(ValueError, match=r"C=3.*d\*=6"):
        looc(code_dim=6, in_channels=3, interp_scale=1, segment_layout="unshuffle")
