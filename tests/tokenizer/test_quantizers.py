import pytest
import torch
import torch.nn.functional as F

import tokenizer.quantizers.core as core
from tokenizer.quantizers import (
    ClusteredQuantizer,
    LooCQuantizer,
    VectorQuantizer,
    build_quantizer,
    nearest_code,
)
from tokenizer.quantizers.search import MIN_TILE_ROWS, search_budget, tile_shape, tiles_per_search

KINDS = {
    "vq": dict(num_codes=32, code_dim=8),
    "vq-ema": dict(num_codes=32, code_dim=8, ema=True),
    "cvq": dict(num_codes=32, code_dim=8),
    "looc": dict(num_codes=32, code_dim=4),
}


def make(name, **extra):
    kind = name.split("-")[0]
    return build_quantizer(kind, **{**KINDS[name], **extra})


def clusters(n_clusters=512, dim=8, batch=32, hw=8, spread=3.0, noise=0.05, seed=0):
    """B×C×H×W features drawn around ``n_clusters`` centres far from the codebook's
    U(−1/K, 1/K) initialisation."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * spread + spread
    pick = torch.randint(0, n_clusters, (batch * hw * hw,), generator=g)
    rows = centres[pick] + noise * torch.randn(batch * hw * hw, dim, generator=g)
    return rows.view(batch, hw, hw, dim).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", list(KINDS))
def test_straight_through_gradient_is_identity(name):
    torch.manual_seed(0)
    q = make(name)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(out.z_q)
    out.z_q.backward(upstream)
    assert torch.equal(z.grad, upstream)


@pytest.mark.parametrize("name", ["vq", "cvq", "looc"])
def test_codebook_learns_from_codebook_loss_and_beta_weights_commitment(name):
    torch.manual_seed(0)
    z = torch.randn(2, 8, 4, 4)
    grads = {}
    for beta in (0.25, 1.0):
        torch.manual_seed(1)
        q = make(name, beta=beta).eval()  # eval: no anchor update, pure losses
        zz = z.clone().requires_grad_(True)
        out = q(zz)
        out.loss.backward()
        used = out.counts > 0
        assert q.codebook.grad[used].abs().sum() > 0, "used codes get gradient"
        assert q.codebook.grad[~used].abs().sum() == 0, "unused codes get none"
        grads[beta] = (q.codebook.grad.clone(), zz.grad.clone())
    # beta multiplies the commitment term only: codebook gradient independent of beta,
    # encoder gradient proportional to it (taming's "legacy" placement would invert this).
    assert torch.allclose(grads[0.25][0], grads[1.0][0])
    assert torch.allclose(grads[0.25][1] * 4, grads[1.0][1], atol=1e-7)


def test_loss_matches_hand_computation():
    q = VectorQuantizer(num_codes=2, code_dim=2, beta=0.25)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([[0.2, 0.1], [0.9, 1.3]]).t().reshape(1, 2, 1, 2)
    out = q(z)
    e = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    rows = z.permute(0, 2, 3, 1).reshape(-1, 2)
    expected = (1 + 0.25) * F.mse_loss(rows, e)
    assert out.indices.tolist() == [[[0, 1]]]
    assert torch.allclose(out.loss, expected)
    assert out.counts.tolist() == [1, 1]
    assert torch.allclose(out.perplexity, torch.tensor(2.0))


def _train_and_measure_usage(q, z, steps=150, lr=1e-2):
    opt = torch.optim.Adam(
        [p for p in q.parameters() if p.requires_grad] or [torch.zeros(1)], lr=lr
    )
    q.train()
    for _ in range(steps):
        out = q(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    q.eval()
    with torch.no_grad():
        counts = q(z).counts
    return (counts > 0).float().mean().item()


def test_dead_codes_revive_under_cvq_and_looc_but_not_vq(capsys):
    z = clusters()
    usage = {}
    for name, q in {
        "vq": VectorQuantizer(num_codes=64, code_dim=8),
        "cvq": ClusteredQuantizer(num_codes=64, code_dim=8),
        "looc": LooCQuantizer(num_codes=64, code_dim=4, in_channels=8),
        "looc-l2": LooCQuantizer(num_codes=64, code_dim=4, distance="l2"),
    }.items():
        torch.manual_seed(0)
        usage[name] = _train_and_measure_usage(q, z)
    with capsys.disabled():
        print(
            "\ncodebook usage after 150 steps on 512 clusters, K=64:",
            {k: f"{100 * v:.0f}%" for k, v in usage.items()},
        )
    assert usage["vq"] < 0.5
    assert usage["cvq"] >= 0.95
    assert usage["looc"] >= 0.95
    assert usage["looc-l2"] >= 0.95


@pytest.mark.parametrize("anchor", ["random", "unique", "closest", "probabilistic"])
def test_every_anchor_revives_codes(anchor):
    torch.manual_seed(0)
    vq = _train_and_measure_usage(VectorQuantizer(num_codes=64, code_dim=8), clusters())
    torch.manual_seed(0)
    cvq = ClusteredQuantizer(num_codes=64, code_dim=8, anchor=anchor)
    assert _train_and_measure_usage(cvq, clusters()) >= max(0.85, vq + 0.4)


@pytest.mark.parametrize("name", list(KINDS))
def test_decode_indices_reproduces_z_q_exactly(name):
    torch.manual_seed(0)
    q = make(name)
    z = torch.randn(3, 8, 5, 6)
    q.train()
    q(z)  # one update so the codebook is not the initial one
    q.eval()
    out = q(z)
    assert torch.equal(q.decode_indices(out.indices), out.z_q)


def test_eval_mode_changes_nothing():
    q = make("cvq")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    q(torch.randn(2, 8, 4, 4))
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_keeps_running_usage_and_resume_is_exact():
    z = clusters(batch=4)
    torch.manual_seed(0)
    a = ClusteredQuantizer(num_codes=32, code_dim=8, anchor="probabilistic")
    for _ in range(3):
        a(z)
    assert a.usage.sum() > 0
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    rng = torch.get_rng_state()
    for _ in range(3):
        a(z)

    b = ClusteredQuantizer(num_codes=32, code_dim=8, anchor="probabilistic")
    b.load_state_dict(saved)
    assert torch.equal(b.usage, saved["usage"])
    torch.set_rng_state(rng)
    for _ in range(3):
        b(z)
    assert torch.equal(a.codebook, b.codebook)
    assert torch.equal(a.usage, b.usage)


def test_offline_variant_reinitialises_once_and_remembers_it():
    z = clusters(batch=4)
    q = ClusteredQuantizer(num_codes=32, code_dim=8, online=False)
    assert not q.initialised
    initial = q.codebook.detach().clone()
    q(z)
    assert q.initialised
    after_first = q.codebook.detach().clone()
    assert not torch.equal(initial, after_first)
    q(z)
    assert torch.equal(q.codebook, after_first), "offline: no anchor update after the first batch"
    assert q.usage.sum() > 0

    fresh = ClusteredQuantizer(num_codes=32, code_dim=8, online=False)
    fresh.load_state_dict(q.state_dict())
    assert fresh.initialised
    fresh(z)
    assert torch.equal(fresh.codebook, q.codebook)


def test_online_variant_keeps_pulling_dead_codes():
    z = clusters(batch=4)
    q = ClusteredQuantizer(num_codes=32, code_dim=8)
    q(z)
    after_first = q.codebook.detach().clone()
    q(z)
    assert not torch.equal(q.codebook, after_first)


def test_alpha_follows_eq5():
    q = ClusteredQuantizer(num_codes=4, code_dim=2, distance="l2", anchor="closest")
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]))
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [8.0, 8.0]]).t().reshape(1, 2, 1, 3)
    old = q.codebook.detach().clone()
    q(z)
    n = torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]) * 0.01
    alpha = torch.exp(-n * 4 * 10 / 0.01 - 1e-3)
    # (8, 8) is assigned to code 1 and is the closest feature of codes 1-3
    anchor = torch.tensor([[8.0, 8.0]]).expand(3, 2)
    expected = old[1:] * (1 - alpha[1:, None]) + anchor * alpha[1:, None]
    assert torch.allclose(q.usage, n)
    assert torch.allclose(q.codebook[1:], expected)
    assert (q.codebook[0] - old[0]).abs().max() < 1e-6  # busy code: alpha ≈ exp(−26.7)


def test_contrastive_loss_adds_a_codebook_gradient():
    torch.manual_seed(0)
    z = torch.randn(4, 8, 4, 4)
    plain = ClusteredQuantizer(num_codes=16, code_dim=8)
    torch.manual_seed(0)
    contrastive = ClusteredQuantizer(num_codes=16, code_dim=8, contrastive_weight=1.0)
    torch.manual_seed(1)
    a = plain(z)
    torch.manual_seed(1)
    b = contrastive(z)
    assert b.loss > a.loss
    b.loss.backward()
    assert contrastive.codebook.grad.abs().sum() > 0


def test_vq_ema_moves_codes_without_gradient():
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=8, code_dim=8, ema=True, ema_decay=0.5)
    assert not q.codebook.requires_grad
    z = clusters(n_clusters=4, batch=4)
    for _ in range(20):
        out = q(z)
    assert out.codebook_loss == 0
    used = out.counts > 0
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    for k in used.nonzero().flatten():
        members = rows[out.indices.flatten() == k]
        assert torch.allclose(q.codebook[k], members.mean(0), atol=1e-3)
    assert {"ema_cluster_size", "ema_embed_sum"} <= set(q.state_dict())


# --- LooC ---------------------------------------------------------------------------------------


def test_looc_with_one_segment_and_no_interpolation_is_cvq():
    z = clusters(batch=4)
    torch.manual_seed(0)
    cvq = ClusteredQuantizer(num_codes=32, code_dim=8, anchor="probabilistic")
    torch.manual_seed(0)
    looc = LooCQuantizer(num_codes=32, code_dim=8, interp_scale=1, anchor="probabilistic")
    for _ in range(3):
        torch.manual_seed(5)
        a = cvq(z)
        torch.manual_seed(5)
        b = looc(z)
        assert torch.equal(a.z_q, b.z_q)
        assert torch.equal(a.loss, b.loss)
        assert torch.equal(a.indices, b.indices.squeeze(-1))
    assert torch.equal(cvq.codebook, looc.codebook)
    assert torch.equal(cvq.usage, looc.usage)


def test_looc_index_layout():
    torch.manual_seed(0)
    q = LooCQuantizer(num_codes=16, code_dim=4, interp_scale=2, distance="l2").eval()
    z = torch.randn(2, 12, 3, 5)
    out = q(z)
    assert out.indices.shape == (2, 6, 10, 3)  # B × βH × βW × m
    assert out.counts.sum() == 2 * 6 * 10 * 3
    up = F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
    b, i, j, s = 1, 4, 7, 2
    segment = up[b, 4 * s : 4 * s + 4, i, j]
    expected = ((q.codebook - segment) ** 2).sum(1).argmin()
    assert out.indices[b, i, j, s] == expected
    # z_q is the β×β average of the quantized up-sampled map
    codes = q.codebook[out.indices].reshape(2, 6, 10, 12).permute(0, 3, 1, 2)
    assert torch.allclose(out.z_q, F.avg_pool2d(codes, 2))


@pytest.mark.parametrize("channels, d", [(10, 4), (12, 5)])
def test_looc_refuses_channels_not_divisible(channels, d):
    q = LooCQuantizer(num_codes=8, code_dim=d)
    with pytest.raises(ValueError, match=rf"C={channels}.*d\*={d}"):
        q(torch.randn(1, channels, 2, 2))
    with pytest.raises(ValueError, match=rf"C={channels}.*d\*={d}"):
        LooCQuantizer(num_codes=8, code_dim=d, in_channels=channels)


@pytest.mark.parametrize("scale", [0, -1, 1.5])
def test_looc_refuses_bad_interp_scale(scale):
    with pytest.raises(ValueError, match=rf"interp_scale.*{scale}"):
        LooCQuantizer(num_codes=8, code_dim=4, interp_scale=scale)


# --- precision, search, construction ------------------------------------------------------------


@pytest.mark.parametrize("name", ["vq", "cvq", "looc"])
def test_search_and_update_run_in_fp32_under_bf16_autocast(name, monkeypatch):
    from tokenizer.quantizers import cvq

    seen = []

    def spying(real):
        def spy(rows, codebook, *args, **kwargs):
            seen.append((rows.dtype, codebook.dtype))
            return real(rows, codebook, *args, **kwargs)

        return spy

    monkeypatch.setattr(core, "nearest_code", spying(core.nearest_code))  # VQ, evaluation
    monkeypatch.setattr(cvq, "search_and_anchor", spying(cvq.search_and_anchor))  # CVQ, LooC
    torch.manual_seed(0)
    q = make(name)
    z = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert out.z_q.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
    assert q.codebook.dtype == torch.float32


def test_autocast_does_not_change_the_chosen_codes():
    # 512 codes 0.01 apart around a common offset: bf16 scores cannot tell them apart
    g = torch.Generator().manual_seed(0)
    codebook = 4 + 1e-2 * torch.randn(512, 16, generator=g)
    rows = codebook[torch.randint(0, 512, (256,), generator=g)]
    rows = rows + 1e-4 * torch.randn(256, 16, generator=g)
    z = rows.t().reshape(1, 16, 16, 16)
    q = VectorQuantizer(num_codes=512, code_dim=16, distance="l2").eval()
    with torch.no_grad():
        q.codebook.copy_(codebook)
    reference = torch.cdist(rows.double(), codebook.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = (2 * rows @ codebook.t() - codebook.pow(2).sum(1)).argmax(1)
        autocast = q(z).indices.flatten()
    assert not torch.equal(low_precision, reference), "a bf16 search would pick other codes"
    assert torch.equal(autocast, reference)


def dense_scores(x, codebook, distance):
    """The reference: the whole N×K score matrix at once."""
    if distance == "cosine":
        return F.normalize(x, dim=1) @ F.normalize(codebook, dim=1).t()
    return -torch.cdist(x.double(), codebook.double()).pow(2)


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu", "sync-free"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("n, k, d", [(1000, 37, 4), (4099, 256, 4), (333, 1024, 128), (50, 3, 2)])
def test_tiled_search_and_closest_anchors_equal_the_dense_reference(distance, n, k, d, sync_free):
    from tokenizer.quantizers import search_and_anchor

    g = torch.Generator().manual_seed(n + k)
    x, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    x[7] = x[3]  # duplicate rows
    sim = dense_scores(x, codebook, distance)
    whole = k * min(n, MIN_TILE_ROWS)  # the fewest scores of a tile of the whole codebook
    for elements in (10**9, whole, whole - 1, 3 * k + 7):  # one tile … rows × chunks of codes
        found = search_and_anchor(
            x, codebook, distance, "closest", max_bytes=4 * elements, sync_free=sync_free
        )
        assert torch.equal(found.indices, sim.argmax(1))
        # the same anchor feature (rows 3 and 7 are equal: either may be found, see search.py)
        assert torch.equal(x[found.anchor_row], x[sim.argmax(0)])
        torch.testing.assert_close(
            found.anchor_score.double(), sim.max(0).values.double(), atol=1e-4, rtol=1e-5
        )
        assert torch.equal(nearest_code(x, codebook, distance, 4 * elements), sim.argmax(1))


@pytest.mark.parametrize("dim", [0, 1])
def test_two_level_argmax_is_argmax_with_ties_and_nan(dim):
    from tokenizer.quantizers.search import BLOCK, _first_argmax

    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 8 * BLOCK, generator=g).round(decimals=1)  # many equal scores
    s[0, [5, 3 * BLOCK + 1]] = 9.0  # the same maximum in two blocks: the first wins
    s[1, [BLOCK + 7, BLOCK + 2]] = 9.0  # twice in one block
    s[2, [2 * BLOCK, 7 * BLOCK + 31]] = float("nan")  # argmax takes the first NaN
    s[3] = 1.0  # all equal
    s = s if dim == 1 else s.t().contiguous()
    assert torch.equal(_first_argmax(s, dim), s.argmax(dim))
    assert _first_argmax(s, dim)[:3].tolist() == [5, BLOCK + 2, 2 * BLOCK]


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu", "sync-free"])
@pytest.mark.parametrize("elements", [20000, 10**9], ids=["chunks of codes", "one tile"])
def test_probabilistic_anchor_samples_the_softmax(elements, sync_free):
    from tokenizer.quantizers import search_and_anchor

    x = torch.tensor([[0.0], [1.0], [2.0]])
    codebook = torch.zeros(20000, 1)  # 20,000 independent draws, one per (identical) code
    found = search_and_anchor(
        x,
        codebook,
        "l2",
        "probabilistic",
        generator=torch.Generator().manual_seed(0),
        max_bytes=4 * elements,
        sync_free=sync_free,
    )
    where = found.anchor_row
    freq = torch.bincount(where, minlength=3).float() / 20000
    expected = torch.softmax(-(x.flatten() ** 2), 0)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


@pytest.mark.parametrize("anchor", [None, "closest", "probabilistic"])
def test_sync_free_search_never_asks_the_host(anchor):
    from torch.utils._python_dispatch import TorchDispatchMode

    from tokenizer.quantizers import search_and_anchor

    class Ops(TorchDispatchMode):
        names: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    x, codebook = torch.randn(3000, 4), torch.randn(256, 4)
    with Ops() as ops:
        search_and_anchor(x, codebook, "cosine", anchor, max_bytes=20000, sync_free=True)
    waits = {"nonzero.default", "_local_scalar_dense.default", "item.default"}
    assert "mm.default" in ops.names and not ops.names & waits, ops.names & waits


def test_build_quantizer_rejects_bad_input_with_clear_messages():
    with pytest.raises(ValueError, match=r"unknown quantizer kind 'vqq'.*'cvq'"):
        build_quantizer("vqq")
    with pytest.raises(ValueError, match=r"unknown option.*'anchors'.*allowed.*'anchor'"):
        build_quantizer("cvq", anchors="closest")
    with pytest.raises(ValueError, match=r"anchor must be one of.*'nearest'"):
        build_quantizer("cvq", anchor="nearest")
    with pytest.raises(ValueError, match=r"distance must be one of.*'dot'"):
        build_quantizer("vq", distance="dot")
    with pytest.raises(ValueError, match=r"num_codes.*>= 1.*0"):
        build_quantizer("vq", num_codes=0)
    with pytest.raises(ValueError, match=r"code_dim=8"):
        build_quantizer("vq", code_dim=8)(torch.randn(1, 4, 2, 2))


@pytest.mark.parametrize("name", ["vq", "cvq", "looc"])
def test_counts_are_the_histogram_of_the_indices(name):
    torch.manual_seed(0)
    q = make(name)
    out = q(torch.randn(2, 8, 4, 4))
    expected = torch.bincount(out.indices.flatten(), minlength=q.num_codes)
    assert out.counts.dtype == torch.long and torch.equal(out.counts, expected)


def test_tiles_are_sized_by_the_devices_memory_budget():
    # 1 MiB of scores on the CPU, 256 MiB on an accelerator, or what the caller gives
    assert search_budget(torch.device("cpu")) == 2**18
    assert search_budget(torch.device("cuda")) == search_budget(torch.device("mps")) == 2**26
    assert search_budget(torch.device("cpu"), 4096) == 1024
    gpu = search_budget(torch.device("cuda"))
    # the settings of the recipes: at most 64 tiles per search with the GPU budget, and a
    # 262,144-code search in row blocks × chunks of codes, never a row per tile
    for n, k in ((2_097_152, 1024), (8192, 16_384), (8192, 262_144)):
        assert tiles_per_search(n, k, gpu) <= 64, (n, k)
    rows, codes = tile_shape(8192, 262_144, 2**18)
    assert (rows, codes) == (64, 4096) and rows * codes <= 2**18
    assert tile_shape(1000, 37, 2**18) == (1000, 37)  # one tile
    assert tile_shape(5000, 1024, 2**18) == (256, 1024)  # the whole codebook, rows in tiles
