import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import tokenizer.losses as losses
from engine.config import from_mapping
from tokenizer.losses import (
    ActNorm,
    LossConfig,
    PatchDiscriminator,
    VQGANLoss,
    adaptive_weight,
    build_lpips,
    hinge_d_loss,
    vanilla_d_loss,
)

VGG_FILE = "vgg16-397923af.pth"


def images(batch=2, channels=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=g) * 2 - 1


def gan_loss(**overrides):
    """VQGANLoss without LPIPS and with a small discriminator active from step 0."""
    cfg = dict(perceptual_weight=0.0, disc_start=0, disc_channels=8, disc_layers=2)
    return VQGANLoss({**cfg, **overrides}, lpips_pretrained=False)


class TinyDecoder(nn.Module):
    """Stand-in decoder whose only (and so last) layer is one Conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, z):
        return torch.tanh(self.conv(z))


def reconstruct(seed=0):
    torch.manual_seed(seed)
    decoder = TinyDecoder()
    z = torch.randn(2, 4, 32, 32)
    return decoder, decoder(z)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- adaptive weight (Esser et al. Eq. 7) ---------------------------------------------------


def test_adaptive_weight_matches_hand_computation_and_scales_with_disc_weight():
    decoder, rec = reconstruct()
    x = images()
    nll = (x - rec).abs().mean()
    g = -(rec * torch.linspace(-1, 1, 32)).mean()
    w = decoder.conv.weight
    (gn,) = torch.autograd.grad(nll, w, retain_graph=True)
    (gg,) = torch.autograd.grad(g, w, retain_graph=True)
    expected = gn.norm() / (gg.norm() + 1e-4)
    assert 0 < expected < 1e4
    lam = adaptive_weight(nll, g, w, disc_weight=1.0)
    torch.testing.assert_close(lam, expected)
    torch.testing.assert_close(adaptive_weight(nll, g, w, disc_weight=0.75), 0.75 * expected)
    assert not lam.requires_grad
    # clamping to max_weight, applied before the disc_weight scaling
    torch.testing.assert_close(
        adaptive_weight(nll, g, w, 0.5, max_weight=expected.item() / 2), 0.25 * expected
    )
    big_nll, tiny_g = 100 * nll, 1e-9 * g  # ratio ≈ ‖∇big_nll‖/1e-4 ≫ 1e4 → clamped at 1e4
    assert (100 * gn.norm() / (1e-9 * gg.norm() + 1e-4)) > 1e5
    torch.testing.assert_close(adaptive_weight(big_nll, tiny_g, w, 1.0), torch.tensor(1e4))
    torch.testing.assert_close(adaptive_weight(big_nll, tiny_g, w, 0.5), torch.tensor(5e3))


# ---- d losses -------------------------------------------------------------------------------


def test_hinge_and_vanilla_d_loss_on_fixed_logits():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0])
    fake = torch.tensor([-2.0, -0.5, 1.0, 0.25])
    # relu(1 - real) = [0, .5, 2, 1] → .875; relu(1 + fake) = [0, .5, 2, 1.25] → .9375
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.875 + 0.9375)))
    sp = lambda v: torch.log1p(torch.exp(torch.tensor(v)))  # noqa: E731
    expected = 0.5 * (
        (sp(-2.0) + sp(-0.5) + sp(1.0) + sp(0.0)) / 4
        + (sp(-2.0) + sp(-0.5) + sp(1.0) + sp(0.25)) / 4
    )
    torch.testing.assert_close(vanilla_d_loss(real, fake), expected)


# ---- discriminator --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("norm", ["batch", "actnorm"])
def test_patch_discriminator_shapes_and_structure(size, n_layers, norm):
    d = PatchDiscriminator(in_channels=3, ndf=8, n_layers=n_layers, norm=norm)
    out = d(images(size=size))
    side = size // 2**n_layers - 2
    assert out.shape == (2, 1, side, side)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    widths = [8 * min(2**n, 8) for n in range(n_layers + 1)]
    assert [c.out_channels for c in convs] == widths + [1]
    assert [c.stride[0] for c in convs] == [2] * n_layers + [1, 1]
    norm_type = nn.BatchNorm2d if norm == "batch" else ActNorm
    assert sum(isinstance(m, norm_type) for m in d.modules()) == n_layers
    assert all((c.bias is None) == (norm == "batch") for c in convs[1:-1])


def test_patch_discriminator_init():
    torch.manual_seed(0)
    d = PatchDiscriminator(ndf=64, n_layers=3)
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    bw = torch.cat([m.weight for m in bn])
    assert abs(bw.mean().item() - 1) < 0.01 and 0.01 < bw.std().item() < 0.03
    assert all(m.bias.abs().max() == 0 for m in bn)


def test_actnorm_data_dependent_init_and_state_dict_round_trip():
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([3.0, -2.0, 0.5]).view(1, 3, 1, 1)
    spread = torch.tensor([0.1, 4.0, 1.0]).view(1, 3, 1, 1)
    x = torch.randn(8, 3, 6, 6, generator=g) * spread + shift
    norm = ActNorm(3)
    assert int(norm.initialized) == 0
    y = norm(x)
    per_channel = y.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=1e-4, rtol=0)
    assert int(norm.initialized) == 1
    # a second batch is not re-normalised
    x2 = torch.randn(8, 3, 6, 6, generator=g) * 5 + 7
    assert norm(x2).mean().abs() > 1
    # round trip: the copy is initialised and does not re-initialise on new data
    copy = ActNorm(3)
    copy.load_state_dict(norm.state_dict())
    assert "initialized" in norm.state_dict() and int(copy.initialized) == 1
    torch.testing.assert_close(copy(x2), norm(x2))


def test_actnorm_does_not_initialise_in_eval_mode():
    norm = ActNorm(2).eval()
    x = torch.randn(4, 2, 3, 3) * 3 + 1
    torch.testing.assert_close(norm(x), x)
    assert int(norm.initialized) == 0


# ---- VQGANLoss ------------------------------------------------------------------------------


def test_discriminator_untouched_before_disc_start():
    loss = gan_loss(disc_start=100)
    calls = []
    loss.discriminator.register_forward_hook(lambda *args: calls.append(1))
    before = snapshot(loss.discriminator)
    decoder, rec = reconstruct()
    x = images()
    q = torch.tensor(0.3)
    total, logs = loss.generator_loss(x, rec, q, decoder.conv.weight, step=99)
    total.backward()
    d_loss, d_logs = loss.discriminator_loss(x, rec, step=99)
    assert not loss.disc_active(99) and calls == []
    assert d_loss.item() == 0 and not d_loss.requires_grad and d_logs["d_loss"] == 0.0
    assert all(p.grad is None for p in loss.discriminator.parameters())
    after = snapshot(loss.discriminator)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert logs["g_loss"] == 0.0 and logs["d_weight"] == 0.0 and logs["disc_factor"] == 0.0
    torch.testing.assert_close(total, (x - rec).abs().mean() + q)

    # from disc_start on, D runs: BatchNorm statistics move and the GAN term enters the total
    assert loss.disc_active(100)
    decoder, rec = reconstruct()
    total, logs = loss.generator_loss(x, rec, q, decoder.conv.weight, step=100)
    d_loss, d_logs = loss.discriminator_loss(x, rec, step=100)
    assert len(calls) == 3 and d_loss.requires_grad and d_logs["d_loss"] > 0
    assert logs["d_weight"] > 0 and logs["disc_factor"] == 1.0 and logs["g_loss"] != 0
    after = snapshot(loss.discriminator)
    assert not torch.equal(before["main.3.running_mean"], after["main.3.running_mean"])


def test_total_generator_loss_equals_its_terms():
    loss = gan_loss(codebook_weight=0.25, disc_factor=0.5, disc_weight=0.8, pixel_weight=2.0)
    decoder, rec = reconstruct()
    x = images()
    q = torch.tensor(0.7)
    torch.manual_seed(1)
    total, logs = loss.generator_loss(x, rec, q, decoder.conv.weight, step=5)
    nll = 2.0 * (x - rec).abs().mean()
    g = -loss.discriminator(rec).mean()  # train-mode BN: same batch → same logits
    w = decoder.conv.weight
    (gn,) = torch.autograd.grad(nll, w, retain_graph=True)
    (gg,) = torch.autograd.grad(g, w, retain_graph=True)
    lam = 0.8 * (gn.norm() / (gg.norm() + 1e-4))
    expected = nll + lam * 0.5 * g + 0.25 * q
    torch.testing.assert_close(total, expected)
    assert logs["total"] == pytest.approx(expected.item(), rel=1e-5)
    assert logs["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert logs["pixel"] == pytest.approx((x - rec).abs().mean().item(), rel=1e-5)
    assert logs["g_loss"] == pytest.approx(g.item(), rel=1e-5)
    assert logs["d_weight"] == pytest.approx(lam.item(), rel=1e-5)
    assert logs["disc_factor"] == 0.5 and logs["quantizer"] == pytest.approx(0.7)
    assert logs["perceptual"] == 0.0
    terms = {k: v for k, v in logs.items() if k != "disc_factor"}  # kept on the device
    assert all(v.shape == () and not v.requires_grad for v in terms.values())
    # gradients reach the decoder through every term
    total.backward()
    assert decoder.conv.weight.grad is not None


@pytest.mark.parametrize("kind,fn", [("hinge", hinge_d_loss), ("vanilla", vanilla_d_loss)])
def test_discriminator_loss_uses_detached_images_and_factor(kind, fn):
    loss = gan_loss(disc_loss=kind, disc_factor=0.5)
    decoder, rec = reconstruct()
    x = images()
    d_loss, logs = loss.discriminator_loss(x, rec, step=0)
    real, fake = loss.discriminator(x), loss.discriminator(rec.detach())
    torch.testing.assert_close(d_loss, 0.5 * fn(real, fake))
    assert logs["logits_real"] == pytest.approx(real.mean().item(), rel=1e-5, abs=1e-6)
    assert logs["logits_fake"] == pytest.approx(fake.mean().item(), rel=1e-5, abs=1e-6)
    d_loss.backward()
    assert decoder.conv.weight.grad is None  # reconstructions were detached
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_adaptive_weight_falls_back_to_zero_without_grad():
    loss = gan_loss().eval()
    decoder, _ = reconstruct()
    x = images()
    with torch.no_grad():
        rec = decoder(torch.randn(2, 4, 32, 32))
        total, logs = loss.generator_loss(x, rec, torch.tensor(0.1), decoder.conv.weight, step=10)
    assert logs["d_weight"] == 0.0 and logs["g_loss"] != 0.0
    torch.testing.assert_close(total, (x - rec).abs().mean() + 0.1)


def test_plain_vqvae_setting_builds_neither_lpips_nor_discriminator(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("must not be built")

    monkeypatch.setattr(losses, "build_lpips", forbidden)
    monkeypatch.setattr(losses, "PatchDiscriminator", forbidden)
    loss = VQGANLoss(
        {
            "pixel_loss": "l2",
            "perceptual_weight": 0,
            "disc_weight": 0,
            "codebook_weight": 1.0,
            "disc_start": 0,
        }
    )
    assert loss.lpips is None and loss.discriminator is None
    assert list(loss.parameters()) == [] and not loss.disc_active(10**9)
    decoder, rec = reconstruct()
    x, q = images(), torch.tensor(0.4)
    total, logs = loss.generator_loss(x, rec, q, decoder.conv.weight, step=10**9)
    torch.testing.assert_close(total, F.mse_loss(rec, x) + q)
    assert logs["perceptual"] == 0.0 and logs["g_loss"] == 0.0
    d_loss, _ = loss.discriminator_loss(x, rec, step=10**9)
    assert d_loss.item() == 0.0


# ---- LPIPS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_lpips():
    return build_lpips(pretrained=False)


def test_build_lpips_random_backbone_offline(random_lpips):
    lp = random_lpips
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    x = images(seed=0)
    y = images(seed=1)
    assert lp(x, x).abs().max().item() < 1e-6
    assert (lp(x, y) > 0).all()


def test_perceptual_term_in_nll_and_lpips_stays_in_eval(random_lpips, monkeypatch):
    monkeypatch.setattr(losses, "build_lpips", lambda pretrained=True: random_lpips)
    loss = VQGANLoss({"perceptual_weight": 0.5, "disc_weight": 0}).train()
    assert loss.lpips is random_lpips and not loss.lpips.training
    decoder, rec = reconstruct()
    x = images()
    total, logs = loss.generator_loss(x, rec, torch.tensor(0.0), decoder.conv.weight, step=0)
    p = random_lpips(x, rec)
    assert p.shape == (2, 1, 1, 1) and p.min() > 0
    torch.testing.assert_close(total, ((x - rec).abs() + 0.5 * p).mean())
    assert logs["perceptual"] == pytest.approx(p.mean().item(), rel=1e-5)
    grey = images(channels=1)  # grey images are repeated to RGB for LPIPS
    loss.generator_loss(grey, grey.flip(-1), torch.tensor(0.0), decoder.conv.weight, step=0)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """Empty temporary torch hub dir; downloads are forbidden; the old hub dir is restored."""

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_build_lpips_missing_vgg_weights_names_file_and_directory(hub_dir):
    with pytest.raises(FileNotFoundError) as err:
        build_lpips(pretrained=True)
    message = str(err.value)
    assert VGG_FILE in message and os.path.join(str(hub_dir), "checkpoints") in message
    assert "https://download.pytorch.org/models/" + VGG_FILE in message
    assert "perceptual_weight: 0" in message


def test_build_lpips_loads_cached_vgg_weights_without_network(hub_dir):
    # A fake but complete VGG16 state_dict: every tensor a stride-0 broadcast of one value (a few
    # KB on disk instead of 528 MB), and the first conv a real tensor we can recognise.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    fake = {k: torch.full((1,), 0.01).expand(s) for k, s in shapes.items()}
    marker = torch.randn(shapes["features.0.weight"], generator=torch.Generator().manual_seed(3))
    fake["features.0.weight"] = marker
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(fake, hub_dir / "checkpoints" / VGG_FILE)
    lp = build_lpips(pretrained=True)
    first_conv = lp.net.slice1[0]
    assert torch.equal(first_conv.weight, marker)
    assert torch.all(lp.net.slice5[-2].weight == 0.01)
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    x = images()
    assert lp(x, x).abs().max().item() < 1e-6


# ---- config validation ----------------------------------------------------------------------


def test_unknown_config_key_is_named_with_allowed_keys():
    with pytest.raises(ValueError, match="disc_wieght") as err:
        VQGANLoss({"disc_wieght": 0.5, "perceptual_weight": 0}, lpips_pretrained=False)
    assert "disc_weight" in str(err.value) and "codebook_weight" in str(err.value)


@pytest.mark.parametrize(
    "key,value",
    [
        ("pixel_loss", "l3"),
        ("disc_loss", "wgan"),
        ("disc_norm", "group"),
        ("perceptual_weight", -1.0),
        ("disc_weight", -0.1),
        ("codebook_weight", -2),
        ("pixel_weight", -1),
        ("disc_factor", -1.0),
        ("disc_layers", 0),
        ("disc_start", -5),
        ("disc_channels", 2.5),
        ("disc_weight", "much"),
    ],
)
def test_invalid_config_values_name_key_and_value(key, value):
    with pytest.raises(ValueError, match=key) as err:
        VQGANLoss(
            {key: value, "perceptual_weight": 0} if key != "perceptual_weight" else {key: value},
            lpips_pretrained=False,
        )
    assert repr(value) in str(err.value)
    with pytest.raises(ValueError, match=key):
        LossConfig(**{key: value})


def test_config_accepts_dataclass_and_parses_numeric_strings():
    cfg = LossConfig(perceptual_weight=0, disc_weight="1e-1", disc_start=0)
    assert cfg.disc_weight == pytest.approx(0.1) and isinstance(cfg.disc_weight, float)
    loss = VQGANLoss(cfg, lpips_pretrained=False)
    assert loss.config is cfg and isinstance(loss.discriminator, PatchDiscriminator)
    assert from_mapping(LossConfig, {}, "loss") == LossConfig()


def test_generator_step_leaves_discriminator_gradients_alone():
    torch.manual_seed(0)
    loss = VQGANLoss(
        {"perceptual_weight": 0.0, "disc_start": 0, "disc_channels": 8, "disc_layers": 1},
        lpips_pretrained=False,
    )
    decoder = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = decoder(x)
    total, _ = loss.generator_loss(x, recon, torch.zeros(()), decoder.weight, step=0)
    total.backward()
    assert decoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.discriminator.parameters())
