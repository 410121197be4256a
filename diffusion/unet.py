"""The stage-two denoiser: a diffusers ``UNet2DModel`` sized from the config and shaped by the
frozen tokenizer's latents."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import DDPMScheduler, UNet2DModel

from engine.config import check_types, require
from pipelines import NOISE_SCHEDULE


@dataclass
class UNetConfig:
    """``unet`` section (LDM's knobs; the input shape comes from the tokenizer).

    block_out_channels: channels of each resolution level (LDM: model_channels × channel_mult).
    layers_per_block: residual blocks per level (LDM: num_res_blocks).
    attention_resolutions: latent sides (e.g. [32, 16, 8]) whose levels get self-attention.
    attention_head_dim: channels per attention head (LDM: num_head_channels).
    norm_num_groups: GroupNorm groups.
    dropout: dropout in the residual blocks.
    num_classes: 0 for an unconditional model; N for N classes, which gives the UNet
      N + 1 class embeddings, id N being the null class of classifier-free guidance.
    """

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    layers_per_block: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 8])
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    dropout: float = 0.0
    num_classes: int = 0

    def __post_init__(self):
        check_types(self, "unet")
        for key in ("attention_head_dim", "norm_num_groups"):
            require(getattr(self, key) >= 1, f"unet.{key}", getattr(self, key), "must be >= 1")
        require(0 <= self.dropout < 1, "unet.dropout", self.dropout, "must be in [0, 1)")
        require(
            all(side >= 1 for side in self.attention_resolutions),
            "unet.attention_resolutions",
            self.attention_resolutions,
            "latent sides >= 1 (or [] for no attention)",
        )
        require(
            len(self.block_out_channels) >= 1 and min(self.block_out_channels) >= 1,
            "unet.block_out_channels",
            self.block_out_channels,
            "positive channel counts",
        )
        require(
            all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
            "unet.block_out_channels",
            self.block_out_channels,
            f"each must be divisible by unet.norm_num_groups={self.norm_num_groups}",
        )
        require(
            self.layers_per_block >= 1,
            "unet.layers_per_block",
            self.layers_per_block,
            "must be >= 1",
        )
        require(
            self.num_classes >= 0,
            "unet.num_classes",
            self.num_classes,
            "0 (unconditional) or the number of classes",
        )
        require(0 <= self.dropout < 1, "unet.dropout", self.dropout, "must be in [0, 1)")


def build_unet(config: UNetConfig, latent_channels: int, latent_size: int) -> UNet2DModel:
    """A UNet2DModel for latents of ``latent_channels`` × ``latent_size``²."""
    levels = len(config.block_out_channels)
    require(
        latent_size % 2 ** (levels - 1) == 0,
        "unet.block_out_channels",
        config.block_out_channels,
        f"{levels} levels halve the {latent_size}² latents {levels - 1} times; use fewer levels",
    )
    sides = [latent_size // 2**i for i in range(levels)]
    down = [
        "AttnDownBlock2D" if s in config.attention_resolutions else "DownBlock2D" for s in sides
    ]
    up = [
        "AttnUpBlock2D" if s in config.attention_resolutions else "UpBlock2D"
        for s in reversed(sides)
    ]
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        dropout=config.dropout,
        num_class_embeds=config.num_classes + 1 if config.num_classes else None,
    )


def training_scheduler() -> DDPMScheduler:
    """LDM's training schedule: DDPM on ``pipelines.NOISE_SCHEDULE`` (1000 steps, "linear"
    0.0015 → 0.0195 in √β, diffusers' ``scaled_linear``, epsilon prediction), the schedule the
    exported pipeline's DDIM sampler (``pipelines.default_scheduler``) runs on."""
    return DDPMScheduler(**NOISE_SCHEDULE)
