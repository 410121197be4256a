"""Stage two training: latent diffusion on the frozen tokenizer's latents, with ``accelerate``.

The config has five sections: ``unet`` (``UNetConfig``), ``data`` (``DataConfig``, the images
to encode), ``cache`` (``CacheConfig``), ``train`` (``DiffusionTrainConfig``) and ``eval``
(``EvalConfig``, the FID protocol that ``scripts/eval_fid.py`` follows).
``scripts/train_diffusion.py`` is the command line.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image

from engine.config import ConfigError, check_types, parse_yaml, require, to_mapping
from engine.data import DataConfig, check_source_exists
from engine.distributed import check_replicas_agree
from engine.run import Run, learning_rate, start_accelerator
from pipelines import (
    ClassConditionalLatentDiffusionPipeline,
    LatentDiffusionPipeline,
    default_scheduler,
)
from pipelines.model_card import write_model_card
from pipelines.sampling import TRAINING_CONFIG
from tokenizer import VQTokenizer

from .evaluate import EvalConfig
from .latent_cache import DTYPES, build_latent_cache, measure_scaling_factor
from .unet import UNetConfig, build_unet, training_scheduler


@dataclass
class CacheConfig:
    """``cache`` section.

    dir: where the encoded latents go (default: OUTPUT_DIR/latents). A cache built for another
      tokenizer or data config is refused, never reused.
    quantized: cache the quantized latents z_q (default) or, if false, the pre-quantization
      latents (LDM's original choice).
    flips: also cache every image's horizontal flip (from the same decode).
    dtype: storage of the latents: "float32", or "bfloat16" / "float16" for half the disk and
      page cache (items are float32 again when read).
    batch_size: images per encoding batch.
    shard_size: latents per safetensors shard (even with flips).
    num_workers: DataLoader workers decoding images while the tokenizer encodes.
    The encoder runs under ``train.mixed_precision`` (the quantizer searches in float32).
    """

    dir: str | None = None
    quantized: bool = True
    flips: bool = False
    dtype: str = "float32"
    batch_size: int = 64
    shard_size: int = 4096
    num_workers: int = 0

    def __post_init__(self):
        check_types(self, "cache")
        require(self.batch_size >= 1, "cache.batch_size", self.batch_size, "must be >= 1")
        require(self.shard_size >= 1, "cache.shard_size", self.shard_size, "must be >= 1")
        require(
            not self.flips or self.shard_size % 2 == 0,
            "cache.shard_size",
            self.shard_size,
            "must be even with cache.flips (an image and its mirror image share a shard)",
        )
        require(self.dtype in DTYPES, "cache.dtype", self.dtype, f"choose one of {list(DTYPES)}")
        require(self.num_workers >= 0, "cache.num_workers", self.num_workers, "must be >= 0")


@dataclass
class DiffusionTrainConfig:
    """``train`` section.

    max_steps, batch_size (latents per process per micro-batch), gradient_accumulation_steps,
    mixed_precision ("no" | "fp16" | "bf16"), seed, num_workers: as for the tokenizer.
    learning_rate: AdamW learning rate after warm-up; scale_lr multiplies it by batch_size ×
      gradient_accumulation_steps × processes (LDM's rule).
    adam_betas, weight_decay: AdamW settings.
    warmup_steps: linear learning-rate warm-up.
    max_grad_norm: gradient clipping (null: none).
    ema_decay: decay of the UNet's EMA (0.9999), reached through EMA warm-up
      1 − (1 + step)^−ema_power; the exported pipeline uses the EMA weights.
    ema_power: EMA warm-up power (2/3 for long runs, 3/4 for short ones).
    label_dropout: probability of replacing a class label by the null class (class-conditional
      models only), which trains the unconditional branch of classifier-free guidance.
    log_every, checkpoint_every, keep_checkpoints, max_nonfinite_steps: as for the tokenizer.
    sample_every: steps between sample grids from the EMA weights (OUTPUT_DIR/images).
    sample_steps: DDIM steps for those grids.
    sample_guidance: guidance scale for the grids of class-conditional models.
    """

    max_steps: int = 100000
    batch_size: int = 64
    learning_rate: float = 1e-4
    scale_lr: bool = False
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 500
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    ema_decay: float = 0.9999
    ema_power: float = 0.75
    label_dropout: float = 0.1
    seed: int = 0
    num_workers: int = 0
    log_every: int = 50
    sample_every: int = 5000
    sample_steps: int = 50
    sample_guidance: float = 3.0
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5

    def __post_init__(self):
        check_types(self, "train")
        for key in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "sample_every",
            "sample_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "max_nonfinite_steps",
        ):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        require(0 < self.ema_decay < 1, "train.ema_decay", self.ema_decay, "must be in (0, 1)")
        require(
            0 <= self.label_dropout < 1,
            "train.label_dropout",
            self.label_dropout,
            "must be in [0, 1)",
        )
        require(
            self.mixed_precision in ("no", "fp16", "bf16"),
            "train.mixed_precision",
            self.mixed_precision,
            'choose "no", "fp16" or "bf16"',
        )
        require(
            self.sample_guidance >= 1, "train.sample_guidance", self.sample_guidance, "must be >= 1"
        )


@dataclass
class DiffusionConfig:
    """A whole stage-two config: ``unet``, ``data`` (the images to encode, read as the tokenizer
    was trained), ``cache``, ``train`` and ``eval``."""

    unet: UNetConfig
    data: DataConfig
    cache: CacheConfig
    train: DiffusionTrainConfig
    eval: EvalConfig


def load_tokenizer(path: str | Path) -> VQTokenizer:
    """The frozen tokenizer of stage one, with a clear error for a folder that is not one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        hint = " (did you mean its tokenizer/ sub-folder?)" if (path / "tokenizer").is_dir() else ""
        raise ConfigError(
            f"--tokenizer {path}: not a saved tokenizer folder (no config.json)"
            f"{hint}; pass the DIR/tokenizer folder written by train_tokenizer.py"
        )
    tokenizer = VQTokenizer.from_pretrained(path)
    return tokenizer.eval().requires_grad_(False)


def check_compatible(config: DiffusionConfig, tokenizer: VQTokenizer) -> None:
    """The data must be read as the tokenizer was trained."""
    require(
        config.data.resolution == tokenizer.config.resolution,
        "data.resolution",
        config.data.resolution,
        f"must equal the tokenizer's resolution ({tokenizer.config.resolution})",
    )
    require(
        config.data.channels == tokenizer.config.in_channels,
        "data.channels",
        config.data.channels,
        f"must equal the tokenizer's in_channels ({tokenizer.config.in_channels})",
    )


def train_diffusion(
    config: DiffusionConfig,
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    resume: str | None = None,
) -> Path:
    """Encode the data once, train the UNet, checkpoint, and export ``output_dir/pipeline``."""
    train = config.train
    check_source_exists(config.data)  # before anything is built (configs may name absent data)
    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_compatible(config, tokenizer)
    accelerator = start_accelerator(train, output_dir)
    tokenizer.to(accelerator.device)

    cache = build_latent_cache(
        tokenizer,
        config.data,
        config.cache.dir or output_dir / "latents",
        quantized=config.cache.quantized,
        flips=config.cache.flips,
        dtype=config.cache.dtype,
        batch_size=config.cache.batch_size,
        shard_size=config.cache.shard_size,
        accelerator=accelerator,
        num_workers=config.cache.num_workers,
    )
    scale = measure_scaling_factor(cache)
    tokenizer.register_to_config(scaling_factor=float(scale))  # exported with the pipeline
    num_classes = config.unet.num_classes
    if num_classes:
        low, high = cache.metadata["label_min"], cache.metadata["label_max"]
        require(
            low >= 0 and high < num_classes,
            "unet.num_classes",
            num_classes,
            f"the data's labels span {low}..{high} (a class-conditional model needs every "
            "item labelled in [0, num_classes))",
        )
    channels, side = cache.metadata["latent_shape"][0], cache.metadata["latent_shape"][-1]
    unet = build_unet(config.unet, channels, side)
    ema = EMAModel(
        unet.parameters(),
        decay=train.ema_decay,
        use_ema_warmup=True,
        power=train.ema_power,
        model_cls=type(unet),
        model_config=unet.config,
    )
    lr = learning_rate(train, accelerator)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=lr, betas=tuple(train.adam_betas), weight_decay=train.weight_decay
    )
    lr_schedule = get_scheduler(
        "constant_with_warmup",
        optimizer,
        num_warmup_steps=train.warmup_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    ema.to(accelerator.device)
    run = Run(accelerator, output_dir, config, {"ema": ema}, resume=resume, name="diffusion")

    noise_schedule = training_scheduler()
    batches = run.batches(cache)
    for step in run.steps():
        for _ in range(train.gradient_accumulation_steps):
            batch = next(batches)
            latents = batch["latents"].to(accelerator.device, non_blocking=True) * scale
            noise = torch.randn_like(latents)
            t = torch.randint(
                0, noise_schedule.config.num_train_timesteps, (len(latents),), device=latents.device
            )
            noisy = noise_schedule.add_noise(latents, noise, t)
            labels = None
            if num_classes:  # label dropout trains the null class (classifier-free guidance)
                labels = batch["label"].to(accelerator.device)
                drop = torch.rand(len(labels), device=labels.device) < train.label_dropout
                labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
            with accelerator.accumulate(unet):
                prediction = unet(noisy, t, class_labels=labels).sample
                loss = F.mse_loss(prediction.float(), noise.float())
                if not run.finite(loss):
                    break
                accelerator.backward(loss)
                if train.max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), train.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
        if run.skipped:
            continue
        ema.step(unet.parameters())
        if run.due(train.log_every):
            run.log(
                {
                    "loss": loss.item(),
                    "lr": lr_schedule.get_last_lr()[0],
                    "ema_decay": ema.cur_decay_value or 0.0,
                },
                show=("loss",),
            )
        if accelerator.is_main_process and run.due(train.sample_every):
            with _ema_pipeline(accelerator.unwrap_model(unet), ema, tokenizer, num_classes) as pipe:
                _save_grid(
                    pipe, train, num_classes, output_dir / "images" / f"step_{step + 1:08d}.png"
                )

    check_replicas_agree(
        accelerator,
        {
            **{f"unet.{k}": v for k, v in accelerator.unwrap_model(unet).state_dict().items()},
            **{f"ema.{i}": p for i, p in enumerate(ema.shadow_params)},
        },
    )
    export = output_dir / "pipeline"
    if accelerator.is_main_process:
        with _ema_pipeline(accelerator.unwrap_model(unet), ema, tokenizer, num_classes) as pipe:
            pipe.save_pretrained(export)
        describe_export(export, to_mapping(config), Path(tokenizer_dir), bool(num_classes))
        accelerator.print(f"pipeline exported to {export} (latent scaling_factor {scale:.4f})")
    accelerator.end_training()
    return export


def describe_export(export: Path, config: dict, tokenizer_dir: Path, conditional: bool) -> None:
    """Write the training configs of both stages into the pipeline folder
    (``training_config.yaml``, read by ``scripts/eval_fid.py`` for its defaults) and its model
    card."""
    tokenizer_config = tokenizer_dir.parent / "config.yaml"
    configs = {
        "diffusion": config,
        "tokenizer": (
            parse_yaml(tokenizer_config.read_text()) if tokenizer_config.is_file() else None
        ),
    }
    (export / TRAINING_CONFIG).write_text(yaml.safe_dump(configs, sort_keys=False))
    cls = ClassConditionalLatentDiffusionPipeline if conditional else LatentDiffusionPipeline
    write_model_card(export, cls.__name__, configs, conditional)


@contextmanager
def _ema_pipeline(unet, ema: EMAModel, tokenizer: VQTokenizer, num_classes: int):
    """A pipeline whose UNet holds the EMA weights for the duration of the block."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    cls = ClassConditionalLatentDiffusionPipeline if num_classes else LatentDiffusionPipeline
    try:
        yield cls(vqvae=tokenizer, unet=unet.eval(), scheduler=default_scheduler())
    finally:
        ema.restore(unet.parameters())
        unet.train()


@torch.no_grad()
def _save_grid(pipe, train: DiffusionTrainConfig, num_classes: int, path: Path, count: int = 16):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=pipe.device).manual_seed(train.seed)
    if num_classes:
        labels = [i % num_classes for i in range(count)]
        images = pipe(
            labels,
            guidance_scale=train.sample_guidance,
            num_inference_steps=train.sample_steps,
            generator=generator,
            output_type="pt",
        ).images
    else:
        images = pipe(
            batch_size=count,
            num_inference_steps=train.sample_steps,
            generator=generator,
            output_type="pt",
        ).images
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=int(count**0.5))
