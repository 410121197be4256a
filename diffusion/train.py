"""Stage two training: latent diffusion on the frozen tokenizer's latents, with ``accelerate``.

The config has five sections: ``unet`` (``UNetConfig``), ``data`` (``DataConfig``, the images
to encode), ``cache`` (``CacheConfig``, in latent_cache.py), ``train``
(``DiffusionTrainConfig``) and ``eval`` (``EvalConfig``, the FID protocol that
``scripts/eval_fid.py`` follows).
``scripts/train_diffusion.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from engine.accelerator import learning_rate, start_accelerator
from engine.checkpoints import export
from engine.config import ConfigError, require, to_mapping
from engine.data import IMAGE_CHOICE, DataConfig, check_source_exists, class_names, describe_parts
from engine.distributed import check_replicas_agree, check_shared_folder
from engine.run import Run
from engine.run_config import RunConfig
from engine.weights import init_from
from pipelines import (
    ClassConditionalLatentDiffusionPipeline,
    LatentDiffusionPipeline,
    default_scheduler,
)
from pipelines.export import describe_export
from tokenizer import VQTokenizer

from .evaluate import EvalConfig
from .latent_cache import CacheConfig, LatentCache, build_latent_cache, measure_scaling_factor
from .unet import UNetConfig, build_unet, training_scheduler

# diffusers' learning-rate schedules (get_scheduler); "piecewise_constant" needs rules we lack
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


@dataclass
class DiffusionTrainConfig(RunConfig):
    """``train`` section: the keys of :class:`engine.run_config.RunConfig` (defaults below), and

    learning_rate: AdamW learning rate after warm-up.
    adam_betas, weight_decay: AdamW settings.
    lr_scheduler: the learning-rate schedule after warm-up, by diffusers' names ("constant",
      "linear", "cosine", "cosine_with_restarts", "polynomial"; "constant_with_warmup" = constant).
    lr_warmup_steps: linear learning-rate warm-up.
    ema_decay: decay of the UNet's EMA (0.9999), reached through EMA warm-up
      1 − (1 + step)^−ema_power; the exported pipeline uses the EMA weights.
    ema_power: EMA warm-up power (2/3 for long runs, 3/4 for short ones).
    label_dropout: probability of replacing a class label by the null class (class-conditional
      models only), which trains the unconditional branch of classifier-free guidance.
    validation_steps / validation_size: the validation loss is the denoising loss of the EMA
      UNet on up to validation_size latents of the data's ``validation`` part (encoded once
      beside the training latents), with fixed noise and timesteps spread evenly over the
      schedule; OUTPUT_DIR/pipeline-best is the export of the lowest.
    sample_every: steps between sample grids from the EMA weights (OUTPUT_DIR/images and the
      tracker).
    sample_steps: DDIM steps for those grids.
    sample_guidance: guidance scale for the grids of class-conditional models.
    init_from: start the UNet (and its EMA) from an exported pipeline's UNet: a pipeline folder,
      a stage-two run folder or a UNet folder; the ``unet`` section must build the same one.
    """

    max_steps: int = 100000
    batch_size: int = 64
    learning_rate: float = 1e-4
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    ema_decay: float = 0.9999
    ema_power: float = 0.75
    label_dropout: float = 0.1
    log_every: int = 50
    validation_steps: int = 5000
    sample_every: int = 5000
    sample_steps: int = 50
    sample_guidance: float = 3.0
    checkpointing_steps: int = 5000

    def __post_init__(self):
        super().__post_init__()
        for key in ("sample_every", "sample_steps"):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        require(
            self.lr_warmup_steps >= 0, "train.lr_warmup_steps", self.lr_warmup_steps, "must be >= 0"
        )
        require(
            self.lr_scheduler in LR_SCHEDULERS,
            "train.lr_scheduler",
            self.lr_scheduler,
            f"choose one of {list(LR_SCHEDULERS)}",
        )
        require(0 < self.ema_decay < 1, "train.ema_decay", self.ema_decay, "must be in (0, 1)")
        require(self.ema_power > 0, "train.ema_power", self.ema_power, "must be > 0")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        require(
            0 <= self.label_dropout < 1,
            "train.label_dropout",
            self.label_dropout,
            "must be in [0, 1)",
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


def data_of_tokenizer(data: DataConfig, tokenizer: VQTokenizer) -> tuple[DataConfig, str]:
    """Stage two reads the images stage one trained on and held out (the tokenizer's recorded
    ``training_data``) unless the config names a ``data.source``; another source than the
    tokenizer's is warned about (its codes were learned on other images). Returns the data
    config and what to say about it."""
    recorded = tokenizer.config.get("training_data") or {}
    given = getattr(data, "given", set(IMAGE_CHOICE))  # built in code: everything is given
    if recorded and "source" not in given:
        note = (
            f"data: the tokenizer's training data, {recorded['source']!r} (recorded in its "
            "config.json; set data.source to read other images)"
        )
        return dataclasses.replace(data, **recorded), note
    if recorded and recorded["source"] != data.source:
        warnings.warn(
            f"stage two reads data.source {data.source!r}, but the tokenizer was trained on "
            f"{recorded['source']!r} (its config.json): its codes were learned on other images",
            stacklevel=3,
        )
    return data, ""


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
    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    config.data, note = data_of_tokenizer(config.data, tokenizer)
    check_source_exists(config.data)  # before anything is built (configs may name absent data)
    check_compatible(config, tokenizer)
    accelerator = start_accelerator(train, output_dir)
    if note:
        accelerator.print(note)
    tokenizer.to(accelerator.device)

    cache, held_out, scale = prepare_latents(config, tokenizer, accelerator, output_dir)
    num_classes = config.unet.num_classes
    names = class_names(config.data) if num_classes and accelerator.is_main_process else None
    id2label = dict(enumerate(names[:num_classes])) if names else None  # exported, if any
    channels, side = cache.metadata["latent_shape"][0], cache.metadata["latent_shape"][-1]
    unet = build_unet(config.unet, channels, side)
    if train.init_from:
        found = init_from(unet, train.init_from, ("unet", "pipeline/unet"))
        accelerator.print(f"UNet weights from {found}")
    if train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lr = learning_rate(train, accelerator)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=lr, betas=tuple(train.adam_betas), weight_decay=train.weight_decay
    )
    lr_schedule = get_scheduler(
        train.lr_scheduler,
        optimizer,
        # the prepared schedule steps once per process per optimizer step
        num_warmup_steps=train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=train.max_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    ema = EMAModel(  # of the prepared weights, which are process 0's on every process
        unet.parameters(),
        decay=train.ema_decay,
        use_ema_warmup=True,
        power=train.ema_power,
        foreach=True,  # one fused update over all parameters
        model_cls=type(accelerator.unwrap_model(unet)),
        model_config=accelerator.unwrap_model(unet).config,
    )
    run = Run(accelerator, output_dir, config, {"ema": ema}, resume=resume, name="diffusion")

    def save_pipeline(folder: Path) -> Path:
        """The EMA pipeline, its card (naming ``folder``) and configs, swapped in atomically."""

        def save(tmp: Path) -> None:
            unwrapped = accelerator.unwrap_model(unet)
            with _ema_pipeline(unwrapped, ema, tokenizer, num_classes, id2label) as pipe:
                pipe.save_pretrained(tmp)
            conditional = bool(num_classes)
            describe_export(tmp, to_mapping(config), Path(tokenizer_dir), conditional, folder.name)

        return export(folder, save, {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})

    noise_schedule = training_scheduler()
    batches = run.batches(cache)
    for _step in run.steps():
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
                accelerator.backward(loss)
                if not run.check_finite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    break
                if train.max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), train.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
        if run.skipped:
            continue
        ema.step(unet.parameters())
        if run.is_due(train.log_every):
            run.log(
                {
                    "loss": loss.detach(),
                    "lr": lr_schedule.get_last_lr()[0],
                    "ema_decay": ema.cur_decay_value or 0.0,
                },
                show=("loss",),
            )
        if run.is_due(train.validation_steps):
            with _ema_weights(accelerator.unwrap_model(unet), ema) as ema_unet:
                value = validation_loss(
                    accelerator, ema_unet, held_out, scale, noise_schedule, train, num_classes
                )
            if run.record_validation({"validation/loss": value}, "validation/loss"):
                if accelerator.is_main_process:
                    save_pipeline(output_dir / "pipeline-best")
        if accelerator.is_main_process and run.is_due(train.sample_every):
            with _ema_pipeline(accelerator.unwrap_model(unet), ema, tokenizer, num_classes) as pipe:
                run.log_image("samples", _samples(pipe, train, num_classes), 4)

    check_replicas_agree(
        accelerator,
        {
            **{f"unet.{k}": v for k, v in accelerator.unwrap_model(unet).state_dict().items()},
            **{f"ema.{i}": p for i, p in enumerate(ema.shadow_params)},
        },
    )
    last = output_dir / "pipeline"
    if accelerator.is_main_process:
        save_pipeline(last)
        accelerator.print(
            f"pipeline exported to {last} (best validation: {last}-best; latent "
            f"scaling_factor {scale:.4f})"
        )
        if left_out := unreadable_note(cache, held_out):
            accelerator.print(left_out)
    accelerator.end_training()
    return last


def prepare_latents(
    config: DiffusionConfig, tokenizer: VQTokenizer, accelerator, output_dir: Path
) -> tuple[LatentCache, LatentCache, float]:
    """The latent caches of the data's training and validation parts (built, or reused, in
    ``cache.dir``, default OUTPUT_DIR/latents, and beside it in DIR-validation, which never
    holds flips) and the latent scale 1/std, which is written into the tokenizer's config
    (``scaling_factor``, exported with the pipeline). A class-conditional model's labels are
    checked against ``unet.num_classes``."""
    folder = Path(config.cache.dir or output_dir / "latents")
    if config.cache.dir:
        check_shared_folder(accelerator, folder, "cache.dir")
    train_cache = dataclasses.replace(config.cache, dir=str(folder))
    validation_cache = dataclasses.replace(
        config.cache, dir=str(folder.with_name(folder.name + "-validation")), flips=False
    )
    cache = build_latent_cache(tokenizer, config.data, train_cache, accelerator=accelerator)
    held_out = build_latent_cache(
        tokenizer, config.data, validation_cache, part="validation", accelerator=accelerator
    )
    accelerator.print(
        describe_parts(
            config.data, cache.metadata["dataset_size"], held_out.metadata["dataset_size"]
        )
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
    return cache, held_out, scale


def unreadable_note(cache: LatentCache, held_out: LatentCache) -> str:
    """How many unreadable files the two caches left out, with examples ("" if none)."""
    unreadable = [c.metadata["unreadable"] for c in (cache, held_out)]
    if not sum(unreadable):
        return ""
    examples = cache.metadata["unreadable_examples"] + held_out.metadata["unreadable_examples"]
    return (
        f"{sum(unreadable)} unreadable file(s) were left out of the latent caches "
        f"({unreadable[0]} training, {unreadable[1]} validation), e.g. {examples[:3]}"
    )


@torch.no_grad()
def validation_loss(accelerator, unet, held_out, scale, noise_schedule, train, num_classes):
    """The denoising loss (ε-MSE) of ``unet`` on the first ``train.validation_size`` latents of
    ``held_out``, with true labels, noise drawn once from ``train.seed`` and timesteps spread
    evenly over the schedule; each process takes every N-th latent, the mean is over all."""
    n = min(train.validation_size, len(held_out))
    generator = torch.Generator().manual_seed(train.seed)
    noise_all = torch.randn((n, *held_out.metadata["latent_shape"]), generator=generator)
    steps = noise_schedule.config.num_train_timesteps
    t_all = torch.linspace(0, steps - 1, n).round().long()
    total = torch.zeros(2, device=accelerator.device)  # squared-error sum, elements
    mine = torch.arange(accelerator.process_index, n, accelerator.num_processes)
    batches = max(1, len(mine) // train.batch_size)  # none smaller than batch_size unless all
    for ids in mine.tensor_split(batches) if len(mine) else []:
        ids = ids.tolist()
        items = [held_out[i] for i in ids]
        latents = torch.stack([item["latents"] for item in items]).to(accelerator.device) * scale
        noise, t = noise_all[ids].to(latents.device), t_all[ids].to(latents.device)
        labels = None
        if num_classes:
            labels = torch.stack([item["label"] for item in items]).to(latents.device)
        with accelerator.autocast():
            noisy = noise_schedule.add_noise(latents, noise, t)
            prediction = unet(noisy, t, class_labels=labels).sample
        total += torch.stack(
            [(prediction.float() - noise).pow(2).sum(), torch.tensor(noise.numel())]
        ).to(total)
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


@contextmanager
def _ema_weights(unet, ema: EMAModel):
    """``unet`` holding the EMA weights, in eval mode, for the duration of the block."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield unet.eval()
    finally:
        ema.restore(unet.parameters())
        unet.train()


@contextmanager
def _ema_pipeline(unet, ema: EMAModel, tokenizer: VQTokenizer, num_classes: int, id2label=None):
    """A pipeline whose UNet holds the EMA weights for the duration of the block (with the class
    names ``id2label``, if class-conditional)."""
    cls = ClassConditionalLatentDiffusionPipeline if num_classes else LatentDiffusionPipeline
    names = {"id2label": id2label} if num_classes else {}
    with _ema_weights(unet, ema) as ema_unet:
        yield cls(vqvae=tokenizer, unet=ema_unet, scheduler=default_scheduler(), **names)


@torch.no_grad()
def _samples(pipe, train: DiffusionTrainConfig, num_classes: int, count: int = 16):
    """``count`` samples in [0, 1] from ``train.seed`` (classes cycled if conditional)."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=pipe.device).manual_seed(train.seed)
    common = dict(num_inference_steps=train.sample_steps, generator=generator, output_type="pt")
    if num_classes:
        labels = [i % num_classes for i in range(count)]
        return pipe(labels, guidance_scale=train.sample_guidance, **common).images
    return pipe(batch_size=count, **common).images
