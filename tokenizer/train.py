"""Stage one training: the VQGAN tokenizer with ``accelerate`` (one CPU or many GPUs).

The config has four sections: ``model`` (``VQTokenizer`` arguments), ``loss`` (``LossConfig``),
``data`` (``DataConfig``) and ``train`` (``TrainConfig`` below). ``scripts/train_tokenizer.py``
is the command line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast
from torchvision.utils import save_image

from engine.config import (
    ConfigError,
    check_section,
    check_types,
    require,
    signature_hints,
)
from engine.data import DataConfig, build_dataset, check_source_exists
from engine.distributed import check_replicas_agree
from engine.run import Run, learning_rate, start_accelerator

from .losses import LossConfig, VQGANLoss
from .model import VQTokenizer


@dataclass
class TrainConfig:
    """``train`` section.

    max_steps: optimizer steps to train for.
    batch_size: images per process per micro-batch.
    learning_rate: Adam learning rate for the autoencoder and the discriminator.
    scale_lr: if true, the learning rate is multiplied by batch_size × gradient_accumulation_steps
      × number of processes (taming-transformers' rule; its base rate is 4.5e-6).
    adam_betas: (0.5, 0.9) as in VQGAN.
    gradient_accumulation_steps: micro-batches per optimizer step.
    max_grad_norm: clip the autoencoder's gradient norm to this (null: no clipping).
    mixed_precision: "no" | "fp16" | "bf16" (the quantizer always searches in fp32).
    seed: seeds weights, data order and every random draw; a resumed run continues the stream.
    num_workers: DataLoader worker processes.
    log_every: steps between logged losses (TensorBoard under output_dir/logs).
    image_every: steps between reconstruction grids (output_dir/images/step_N.png).
    checkpoint_every: steps between checkpoints (output_dir/checkpoints), written atomically.
    keep_checkpoints: how many checkpoints to keep.
    max_nonfinite_steps: a non-finite loss skips its step; this many in a row stop the run.
    """

    max_steps: int = 10000
    batch_size: int = 8
    learning_rate: float = 4.5e-6
    scale_lr: bool = False
    adam_betas: tuple[float, float] = (0.5, 0.9)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    image_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5

    def __post_init__(self):
        check_types(self, "train")
        for key in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "image_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_nonfinite_steps",
        ):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        require(
            self.mixed_precision in ("no", "fp16", "bf16"),
            "train.mixed_precision",
            self.mixed_precision,
            'choose "no", "fp16" or "bf16"',
        )
        require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "train.adam_betas",
            self.adam_betas,
            "two numbers in [0, 1)",
        )
        require(self.num_workers >= 0, "train.num_workers", self.num_workers, "must be >= 0")


@dataclass
class TokenizerConfig:
    """A whole stage-one config: ``model`` (the ``VQTokenizer`` arguments), ``loss``, ``data``,
    ``train``. Checked before anything is built: every error names its key."""

    model: dict
    loss: LossConfig
    data: DataConfig
    train: TrainConfig

    def __post_init__(self):
        model = self.model = check_section(
            "model", self.model, signature_hints(VQTokenizer.__init__)
        )
        for key in (
            "resolution",
            "in_channels",
            "out_channels",
            "ch",
            "z_channels",
            "embed_dim",
            "norm_groups",
        ):
            if key in model:
                require(model[key] >= 1, f"model.{key}", model[key], "must be >= 1")
        require(
            model.get("num_res_blocks", 0) >= 0,
            "model.num_res_blocks",
            model.get("num_res_blocks"),
            "must be >= 0",
        )
        require(
            all(m >= 1 for m in model.get("ch_mult", [1])),
            "model.ch_mult",
            model.get("ch_mult"),
            "every multiplier must be >= 1",
        )
        try:  # impossible architectures and quantizer options, cheaply, on the meta device
            with torch.device("meta"):
                VQTokenizer(**model)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None
        resolution = model.get("resolution", 256)
        require(
            self.data.resolution == resolution,
            "data.resolution",
            self.data.resolution,
            f"must equal model.resolution ({resolution})",
        )
        in_channels, out_channels = model.get("in_channels", 3), model.get("out_channels", 3)
        require(
            self.data.channels == in_channels,
            "data.channels",
            self.data.channels,
            f"must equal model.in_channels ({in_channels})",
        )
        require(
            self.loss.disc_weight == 0 or self.loss.disc_in_channels == out_channels,
            "loss.disc_in_channels",
            self.loss.disc_in_channels,
            f"must equal model.out_channels ({out_channels})",
        )
        if self.loss.disc_weight > 0 and self.loss.disc_start >= self.train.max_steps:
            warnings.warn(
                f"loss.disc_start={self.loss.disc_start} >= train.max_steps="
                f"{self.train.max_steps}: the discriminator will never be used",
                stacklevel=2,
            )


def train_tokenizer(
    config: TokenizerConfig, output_dir: str | Path, resume: str | None = None
) -> Path:
    """Train, checkpoint, and export ``output_dir/tokenizer``; returns that folder."""
    train = config.train
    check_source_exists(config.data)  # before anything is built (configs may name absent data)
    output_dir = Path(output_dir)
    accelerator = start_accelerator(train, output_dir)
    model = VQTokenizer(**config.model)
    loss_fn = VQGANLoss(config.loss).to(accelerator.device)  # fails fast without VGG weights
    with accelerator.local_main_process_first():  # it lists the data once for everyone
        train_set = build_dataset(config.data, "train")
        val_set = build_dataset(config.data, "validation")
    lr = learning_rate(train, accelerator)
    opt_g = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(train.adam_betas))
    model, opt_g = accelerator.prepare(model, opt_g)
    opt_d = None
    if loss_fn.discriminator is not None:
        opt_d = torch.optim.Adam(
            loss_fn.discriminator.parameters(), lr=lr, betas=tuple(train.adam_betas)
        )
        loss_fn.discriminator, opt_d = accelerator.prepare(loss_fn.discriminator, opt_d)
    trained = [model] if opt_d is None else [model, loss_fn.discriminator]
    run = Run(accelerator, output_dir, config, {}, resume=resume, name="tokenizer")

    unwrapped = accelerator.unwrap_model(model)
    fixed = torch.stack([val_set[i]["pixel_values"] for i in range(min(8, len(val_set)))])
    batches = run.batches(train_set)
    for step in run.steps():
        for _ in range(train.gradient_accumulation_steps):
            x = next(batches)["pixel_values"].to(accelerator.device)
            with accelerator.accumulate(*trained):
                out = model(x)
                with accelerator.autocast():
                    g_loss, logs = loss_fn.generator_loss(
                        x, out.sample, out.quantized.loss, unwrapped.last_layer, step
                    )
                if not run.finite(g_loss):
                    break
                accelerator.backward(g_loss)
                if train.max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                if opt_d is not None and loss_fn.disc_active(step):
                    with accelerator.autocast():
                        d_loss, d_logs = loss_fn.discriminator_loss(x, out.sample.detach(), step)
                    accelerator.backward(d_loss)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    logs.update(d_logs)
        if run.skipped:
            continue
        if run.due(train.log_every):
            counts = accelerator.reduce(out.quantized.counts.float(), reduction="sum")
            p = counts / counts.sum()
            logs["usage"] = (counts > 0).float().mean().item()
            logs["perplexity"] = torch.exp(-(p * p.clamp(min=1e-10).log()).sum()).item()
            run.log(logs, show=("total", "nll", "usage", "perplexity"))
        if accelerator.is_main_process and run.due(train.image_every):
            _save_grid(unwrapped, fixed, output_dir / "images" / f"step_{step + 1:08d}.png")

    replicas = {f"model.{k}": v for k, v in unwrapped.state_dict().items()}
    if opt_d is not None:
        discriminator = accelerator.unwrap_model(loss_fn.discriminator)
        # DDP broadcasts buffers (BatchNorm statistics) from process 0 before every forward, so
        # after the last one each process holds its own; do that broadcast once more
        for buffer in discriminator.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))
        replicas.update({f"discriminator.{k}": v for k, v in discriminator.state_dict().items()})
    check_replicas_agree(accelerator, replicas)
    export = output_dir / "tokenizer"
    if accelerator.is_main_process:
        unwrapped.save_pretrained(export)
        skipped = sorted(set(train_set.skipped) | set(val_set.skipped))
        if skipped:
            accelerator.print(f"{len(skipped)} unreadable file(s) were skipped, e.g. {skipped[:3]}")
        accelerator.print(f"tokenizer exported to {export}")
    accelerator.end_training()
    return export


@torch.no_grad()
def _save_grid(model: VQTokenizer, images: torch.Tensor, path: Path) -> None:
    """Originals (top row) over reconstructions (bottom row)."""
    was_training = model.training
    model.eval()
    images = images.to(model.device)
    recon = model(images).sample
    model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = torch.cat([images, recon.to(images.dtype)]).clamp(-1, 1) * 0.5 + 0.5
    save_image(grid, path, nrow=len(images))
