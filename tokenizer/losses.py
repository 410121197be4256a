"""The VQGAN training loss (Esser et al. 2021, Sec. 3.1; taming-transformers'
``VQLPIPSWithDiscriminator``): pixel + LPIPS reconstruction loss, a PatchGAN discriminator with
the adaptive weight of Eq. 7, and the quantizer's codebook loss.

Trainer contract: one generator step, then (if ``loss.disc_active(step)``) one discriminator
step with its own optimizer. The generator step treats the discriminator's parameters as
constants, so it leaves their gradients (and, under DDP, their synchronisation) alone."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from engine.config import check_types, from_mapping, require
from engine.weights import cached_weights

from .quantizers.distributed import all_reduce_sum


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)`` (Glow, Kingma & Dhariwal 2018), initialised from
    the first training batch so every output channel has zero mean and unit std (over the
    batches of all processes, so every replica starts from the same weights). The
    ``initialized`` flag is a buffer, so a loaded state_dict is never re-initialised; it is read
    from the device once and then known on the host (no wait for the device per step)."""

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.eps = eps
        self._known: bool | None = None  # the flag on the host; None: read it from the buffer

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).float()
        n = all_reduce_sum(flat.new_tensor(flat.shape[1]))
        mean = all_reduce_sum(flat.sum(1)) / n
        variance = all_reduce_sum((flat - mean[:, None]).pow(2).sum(1)) / (n - 1).clamp(min=1)
        self.loc.copy_(-mean.view_as(self.loc))
        self.scale.copy_((1.0 / (variance.sqrt() + self.eps)).view_as(self.scale))
        self.initialized.fill_(1)
        self._known = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if self._known is None:
                self._known = bool(self.initialized)
            if not self._known:
                self._initialize(x)
        return self.scale * (x + self.loc)


_NORMS = {"batch": nn.BatchNorm2d, "actnorm": ActNorm}


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """pix2pix NLayerDiscriminator (Isola et al. 2017): B×C×H×W → B×1×(H/2^n − 2)×(W/2^n − 2)
    patch logits for ``n = n_layers``."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in _NORMS or n_layers < 1:
            raise ValueError(f"norm={norm!r} (one of {list(_NORMS)}), n_layers={n_layers} (>= 1)")
        bias = norm != "batch"  # BatchNorm's shift makes a conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels, out, 4, stride, 1, bias=bias),
                _NORMS[norm](out),
                nn.LeakyReLU(0.2, True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """½·(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def vanilla_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """½·(E[softplus(−D(x))] + E[softplus(D(x̂))]), the non-saturating GAN's cross-entropy."""
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
_D_LOGS = ("d_loss", "logits_real", "logits_fake", "disc_factor")


def build_lpips(pretrained: bool = True) -> nn.Module:
    """Frozen LPIPS-VGG (Zhang et al. 2018), eval mode, inputs in [−1, 1], output B×1×1×1. The
    linear heads ship with ``lpips``; ``pretrained`` loads the ImageNet VGG16 backbone from the
    torch hub cache (downloading it there if possible, see ``engine.weights``);
    ``pretrained=False``: random backbone (tests)."""
    import lpips
    from torchvision.models import VGG16_Weights

    if pretrained:
        cached_weights(
            VGG16_Weights.IMAGENET1K_V1.url,
            "LPIPS (its VGG16 backbone)",
            "or set `perceptual_weight: 0` in the loss config to train without LPIPS",
        )
    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" warning
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=not pretrained, verbose=False)
    return model.eval().requires_grad_(False)


def adaptive_weight(
    nll_loss: Tensor,
    g_loss: Tensor,
    last_layer: Tensor,
    disc_weight: float,
    max_weight: float = 1e4,
) -> Tensor:
    """Esser et al. 2021, Eq. 7: λ = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped to [0, max_weight],
    detached, times ``disc_weight``; ∇_L is the gradient w.r.t. the decoder's last layer weight."""
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * disc_weight


@dataclass
class LossConfig:
    """Keys of the ``loss`` config section:

    pixel_loss: "l1" (|x − x̂|) or "l2" ((x − x̂)²), per pixel.
    pixel_weight: weight of the pixel term inside the reconstruction loss.
    perceptual_weight: weight of LPIPS-VGG in the reconstruction loss; 0 builds no LPIPS.
    codebook_weight: weight of the quantizer's loss (codebook + commitment) in the total.
    disc_weight: scale of the adaptive GAN weight λ (Eq. 7); 0 builds no discriminator.
    disc_start: step from which the discriminator is run and trained.
    disc_factor: multiplier of both GAN losses from ``disc_start`` on (0 before).
    disc_loss: discriminator objective, "hinge" or "vanilla".
    disc_layers / disc_channels / disc_norm / disc_in_channels: PatchDiscriminator's
        ``n_layers`` (>= 1), ``ndf``, ``norm`` ("batch" or "actnorm") and ``in_channels``.
    """

    pixel_loss: str = "l1"
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    disc_weight: float = 0.75
    disc_start: int = 10000
    disc_factor: float = 1.0
    disc_loss: str = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "batch"
    disc_in_channels: int = 3

    def __post_init__(self) -> None:
        check_types(self, "loss")
        require(
            self.pixel_loss in ("l1", "l2"),
            "loss.pixel_loss",
            self.pixel_loss,
            "choose 'l1' or 'l2'",
        )
        require(
            self.disc_loss in _D_LOSSES,
            "loss.disc_loss",
            self.disc_loss,
            f"choose one of {list(_D_LOSSES)}",
        )
        require(
            self.disc_norm in _NORMS,
            "loss.disc_norm",
            self.disc_norm,
            f"choose one of {list(_NORMS)}",
        )
        for f in fields(self):  # numbers: >= 0, sizes >= 1
            if f.type in ("int", "float"):
                low = 1 if f.name in ("disc_layers", "disc_channels", "disc_in_channels") else 0
                value = getattr(self, f.name)
                require(value >= low, f"loss.{f.name}", value, f"must be >= {low}")


class VQGANLoss(nn.Module):
    """Generator and discriminator losses of the VQGAN (taming's ``VQLPIPSWithDiscriminator``).
    ``lpips`` is None when perceptual_weight == 0, ``discriminator`` None when disc_weight == 0.
    Before ``disc_start`` neither loss runs the discriminator (its BatchNorm stats stay put)."""

    def __init__(self, config: LossConfig | dict, lpips_pretrained: bool = True):
        super().__init__()
        cfg = config if isinstance(config, LossConfig) else from_mapping(LossConfig, config, "loss")
        self.config = cfg
        self.lpips = build_lpips(lpips_pretrained) if cfg.perceptual_weight > 0 else None
        self.discriminator = (
            PatchDiscriminator(
                cfg.disc_in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm
            )
            if cfg.disc_weight > 0
            else None
        )
        self.d_loss_fn = _D_LOSSES[cfg.disc_loss]

    def train(self, mode: bool = True) -> VQGANLoss:
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()  # frozen metric: its dropout must stay off
        return self

    def disc_active(self, step: int) -> bool:
        """Whether the GAN terms are on at ``step``; the trainer skips the D step otherwise."""
        c = self.config
        return self.discriminator is not None and c.disc_factor > 0 and step >= c.disc_start

    def _frozen_discriminator(self, x: Tensor) -> Tensor:
        """D(x) with D's parameters as constants: the gradient reaches x only. Runs the bare
        module even when ``self.discriminator`` is wrapped (DDP), so no reducer hook fires."""
        d = getattr(self.discriminator, "module", self.discriminator)
        params = {name: p.detach() for name, p in d.named_parameters()}
        return torch.func.functional_call(d, params, (x,))

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        quantizer_loss: Tensor,
        last_layer: Tensor,
        step: int,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """nll + λ·factor·(−E[D(x̂)]) + codebook_weight·quantizer_loss; images in [−1, 1].
        λ (Eq. 7) falls back to 0 when it cannot be differentiated (no_grad / evaluation).
        The logged terms are detached 0-d float32 tensors (read them at logging steps)."""
        cfg, diff = self.config, inputs - reconstructions
        pixel = diff.abs() if cfg.pixel_loss == "l1" else diff.pow(2)
        rec = cfg.pixel_weight * pixel
        perceptual = pixel.new_zeros(())
        if self.lpips is not None:  # grey images are repeated to RGB for LPIPS-VGG
            rgb = [
                t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t.contiguous()
                for t in (inputs, reconstructions)
            ]
            perceptual = self.lpips(*rgb)
            rec = rec + cfg.perceptual_weight * perceptual  # B×1×1×1, broadcast over pixels
        nll = rec.mean()
        g_loss, d_weight, factor = nll.new_zeros(()), nll.new_zeros(()), 0.0
        if self.disc_active(step):
            factor = cfg.disc_factor
            g_loss = -self._frozen_discriminator(reconstructions.contiguous()).mean()
            if torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad:
                d_weight = adaptive_weight(nll, g_loss, last_layer, cfg.disc_weight)
        total = nll + d_weight * factor * g_loss + cfg.codebook_weight * quantizer_loss
        logs = {
            "total": total,
            "nll": nll,
            "pixel": pixel.mean(),
            "perceptual": perceptual.mean(),
            "g_loss": g_loss,
            "d_weight": d_weight,
            "quantizer": quantizer_loss,
        }
        # logged values stay on the device: reading them waits for it, done at logging steps only
        logs = {k: torch.as_tensor(v).detach().float().reshape(()) for k, v in logs.items()}
        return total, {**logs, "disc_factor": float(factor)}

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """factor·d_loss(D(x), D(x̂)) on detached images. Before ``disc_start`` (see
        ``disc_active``) D is not run and a constant zero (requires_grad False) comes back:
        the trainer must skip backward/step then."""
        if not self.disc_active(step):
            return inputs.new_zeros((), dtype=torch.float32), dict.fromkeys(_D_LOGS, 0.0)
        real = self.discriminator(inputs.detach().contiguous())
        fake = self.discriminator(reconstructions.detach().contiguous())
        d_loss = self.config.disc_factor * self.d_loss_fn(real, fake)
        values = [v.detach().float() for v in (d_loss, real.mean(), fake.mean())]
        return d_loss, dict(zip(_D_LOGS, values + [float(self.config.disc_factor)]))
