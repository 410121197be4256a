"""The VQGAN autoencoder (Esser et al. 2021, the taming-transformers architecture) around any
quantizer of ``build_quantizer``, as a diffusers model: saved as config.json + safetensors,
loaded with ``VQTokenizer.from_pretrained``, and usable as the ``vqvae`` of diffusers'
``LDMPipeline``. Its folder carries this module's code (``model.py``, see ``save_config``), so
diffusers loads it without this package too: ``AutoModel.from_pretrained(folder,
trust_remote_code=True)``."""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import modeling_utils
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.autoencoders.vq_model import VQEncoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .quantizers import QuantizerOutput, build_quantizer
from .remote_code import single_file_source


def _float32_kept(fn):
    """``fn`` (what ``nn.Module._apply`` applies to every tensor) with its dtype change undone:
    floating tensors end up float32, others keep their dtype, on ``fn``'s device. Re-cast from
    the input, not from ``fn``'s output: float32 → bfloat16 → float32 would round the codebook."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        if out.dtype == dtype:
            return out
        return out.to(dtype) if t.is_meta else t.to(device=out.device, dtype=dtype)

    return apply


@contextmanager
def _warning_hidden(logger, text: str):
    """``logger`` without its messages containing ``text``, for the duration of the block."""
    hide = lambda record: text not in record.getMessage()
    logger.addFilter(hide)
    try:
        yield
    finally:
        logger.removeFilter(hide)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        # B×1×HW×C: the 4-D (batch, heads, tokens, channels) layout the fused kernels take
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=3)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(in_ch, out_ch, blocks, attn, dropout, groups) -> nn.ModuleList:
    layers = []
    for _ in range(blocks):
        layers.append(ResnetBlock(in_ch, out_ch, dropout, groups))
        if attn:
            layers.append(AttnBlock(out_ch, groups))
        in_ch = out_ch
    return nn.ModuleList(layers)


def _mid(channels, dropout, groups) -> nn.Sequential:
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout, groups),
        AttnBlock(channels, groups),
        ResnetBlock(channels, channels, dropout, groups),
    )


class _Checkpointable(nn.Module):
    """Runs layers through diffusers' gradient checkpointing when
    ``VQTokenizer.enable_gradient_checkpointing()`` has set ``gradient_checkpointing``."""

    gradient_checkpointing = False

    def run(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer, h)
        return layer(h)


class Encoder(_Checkpointable):
    def __init__(
        self,
        in_channels,
        ch,
        ch_mult,
        num_res_blocks,
        attn_resolutions,
        dropout,
        resolution,
        z_channels,
        groups,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        res, in_ch = resolution, ch
        for i, mult in enumerate(ch_mult):
            out_ch = ch * mult
            self.levels.append(
                _level(in_ch, out_ch, num_res_blocks, res in attn_resolutions, dropout, groups)
            )
            last = i == len(ch_mult) - 1
            self.downsamples.append(nn.Identity() if last else Downsample(out_ch))
            res = res if last else res // 2
            in_ch = out_ch
        self.mid = _mid(in_ch, dropout, groups)
        self.norm_out = _norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level, down in zip(self.levels, self.downsamples):
            for layer in level:
                h = self.run(layer, h)
            h = down(h)
        for layer in self.mid:
            h = self.run(layer, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_Checkpointable):
    def __init__(
        self,
        out_channels,
        ch,
        ch_mult,
        num_res_blocks,
        attn_resolutions,
        dropout,
        resolution,
        z_channels,
        groups,
    ):
        super().__init__()
        in_ch = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid = _mid(in_ch, dropout, groups)
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            out_ch = ch * mult
            self.levels.append(
                _level(in_ch, out_ch, num_res_blocks + 1, res in attn_resolutions, dropout, groups)
            )
            self.upsamples.append(Upsample(out_ch) if i > 0 else nn.Identity())
            res = res * 2 if i > 0 else res
            in_ch = out_ch
        self.norm_out = _norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for layer in self.mid:
            h = self.run(layer, h)
        for level, up in zip(self.levels, self.upsamples):
            for layer in level:
                h = self.run(layer, h)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class VQTokenizerOutput(BaseOutput):
    """``sample``: the reconstruction; ``quantized``: the quantizer's output (loss, indices,
    counts, perplexity). Every field has a default so that accelerate can rebuild it from a
    mapping (``convert_outputs_to_fp32`` under mixed precision)."""

    sample: torch.Tensor | None = None
    quantized: QuantizerOutput | None = None


class VQTokenizer(ModelMixin, ConfigMixin):
    """VQGAN encoder → ``quant_conv`` → quantizer → ``post_quant_conv`` → decoder.

    Config (every key is saved in config.json):
      in_channels, out_channels: image channels (3).
      resolution: training image size; with ``attn_resolutions`` it decides where attention is.
      ch, ch_mult, num_res_blocks, attn_resolutions, dropout: taming's architecture knobs; the
        latent is ``resolution / 2**(len(ch_mult) - 1)`` on a side (f16 for 5 levels).
      z_channels: channels of the encoder output / decoder input.
      embed_dim: channels of the quantized latent (what stage two diffuses).
      norm_groups: GroupNorm groups (32 as in taming; smaller for tiny models).
      quantizer: a kind of ``build_quantizer`` ("vq", "cvq", "looc", "fsq", "lfq", "simvq",
        "ibq"); quantizer_options: its options (``code_dim`` defaults to ``embed_dim``, except
        for looc, where it is d*, which must divide ``embed_dim``; fsq needs ``embed_dim`` =
        len(levels), lfq has K = 2^embed_dim codes).
      scaling_factor: latent scale used by diffusion pipelines (latents · scaling_factor);
        always written explicitly (diffusers' 0.18215 default would silently ruin a VQ model).
      training_data: the ``data`` keys that chose the images stage one trained on and held out
        (written by the trainer; stage two reads the same images unless told otherwise).

    Used like ``diffusers.VQModel`` where the meaning is the same: ``encode(x).latents``,
    ``decode(h, force_not_quantize=False).sample`` (and ``.commit_loss``), ``forward(x,
    return_dict=False)`` → ``(sample, commit_loss)``, ``enable_gradient_checkpointing()``,
    ``config.scaling_factor``, ``from_pretrained`` / ``save_pretrained``. Ours beyond it:
    ``forward`` returns the quantizer's whole output (indices, counts, perplexity) in
    ``.quantized``; ``quantize(h)`` is a method (VQModel's is the quantizer module, ours is
    ``vector_quantizer``); ``decode_indices(indices)`` decodes codes.
    """

    _supports_gradient_checkpointing = True

    # from_pretrained(torch_dtype=float16 / bfloat16) keeps the codebook in float32: nearest-code
    # search on a rounded codebook would pick other codes than training did; so do .to(dtype),
    # .half() and .bfloat16() (see _apply)
    _keep_in_fp32_modules = ["vector_quantizer"]
    # config.json gets "auto_map": {"AutoModel": "model.VQTokenizer"} (what diffusers'
    # register_for_auto_class("AutoModel") sets), naming the code file save_config writes
    _auto_class = "AutoModel"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        resolution: int = 256,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        z_channels: int = 256,
        embed_dim: int = 256,
        norm_groups: int = 32,
        quantizer: str = "cvq",
        quantizer_options: dict | None = None,
        scaling_factor: float = 1.0,
        training_data: dict | None = None,
    ):
        super().__init__()
        arch = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            dropout=dropout,
            resolution=resolution,
            z_channels=z_channels,
            groups=norm_groups,
        )
        self.encoder = Encoder(in_channels, **arch)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        options = dict(quantizer_options or {})
        if quantizer == "looc":
            options.setdefault("in_channels", embed_dim)
        else:
            options.setdefault("code_dim", embed_dim)
        self.vector_quantizer = build_quantizer(quantizer, **options)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(out_channels, **arch)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the VQGAN adaptive weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1] → pre-quantization latents (``.latents``), like ``VQModel``."""
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def quantize(self, h: torch.Tensor) -> QuantizerOutput:
        return self.vector_quantizer(h)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True):
        """Latents → images. The latents are quantized first unless ``force_not_quantize``."""
        q = None if force_not_quantize else self.quantize(h)
        z = h if q is None else q.z_q
        # z comes in the latents' dtype, not necessarily the convolutions' (half precision)
        image = self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))
        commit_loss = None if q is None else q.loss
        return DecoderOutput(sample=image, commit_loss=commit_loss) if return_dict else (image,)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (the quantizer's layout) → images."""
        z_q = self.vector_quantizer.decode_indices(indices).to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor, return_dict: bool = True):
        """Images → reconstructions and the quantizer's output; with ``return_dict=False`` the
        tuple ``(sample, commit_loss)``, as ``VQModel`` returns."""
        q = self.quantize(self.encode(x).latents)
        sample = self.decoder(self.post_quant_conv(q.z_q))
        return VQTokenizerOutput(sample=sample, quantized=q) if return_dict else (sample, q.loss)

    # ------------------------------------------------------------------ precision

    def _apply(self, fn, recurse: bool = True):
        """What ``to``, ``half``, ``bfloat16``, ``cuda``... run: ``fn`` on every tensor, except
        that the floating tensors of the ``_keep_in_fp32_modules`` stay float32 (they still move
        between devices), as when loading with ``torch_dtype``."""
        if recurse:
            for name, child in self.named_children():
                child._apply(_float32_kept(fn) if name in self._keep_in_fp32_modules else fn)
        return super()._apply(fn, recurse=False)

    def to(self, *args, **kwargs):
        # ModelMixin.to warns on every dtype cast that the fp32 modules may give "inconsistent
        # results"; _apply keeps them float32, so here that warning would be wrong
        with _warning_hidden(modeling_utils.logger, "should be kept in float32"):
            return super().to(*args, **kwargs)

    # ------------------------------------------------------------------ saving

    def save_config(self, save_directory: str | os.PathLike, *args, **kwargs):
        """diffusers' ``save_config`` (config.json, whose ``auto_map`` names ``<module>.py``), plus
        that file: this module and the quantizers' modules as one file (``single_file_source``),
        which diffusers runs with ``trust_remote_code=True`` when this package is not there."""
        os.makedirs(save_directory, exist_ok=True)
        module = type(self).__module__.rsplit(".", 1)[-1]  # as diffusers names it in auto_map
        code = single_file_source(inspect.getfile(type(self)))
        Path(save_directory, f"{module}.py").write_text(code, encoding="utf-8")
        super().save_config(save_directory, *args, **kwargs)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # auto_map points diffusers' AutoModel at the code file; it is no argument of __init__
        config_dict = {k: v for k, v in config_dict.items() if k != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)
