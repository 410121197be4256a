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

from engine.accelerator import learning_rate, start_accelerator
from engine.checkpoints import export
from engine.config import (
    ConfigError,
    check_section,
    require,
    signature_hints,
)
from engine.data import (
    DataConfig,
    build_dataset,
    check_source_exists,
    describe_parts,
    image_choice,
)
from engine.distributed import check_replicas_agree
from engine.run import Run
from engine.run_config import RunConfig
from engine.weights import init_from

from .losses import LossConfig, VQGANLoss
from .model import VQTokenizer

# where train.init_from finds the tokenizer: a run folder, a pipeline folder
INIT_FOLDERS = ("tokenizer", "vqvae", "pipeline/vqvae")


@dataclass
class TrainConfig(RunConfig):
    """``train`` section: the keys of :class:`engine.run_config.RunConfig` (defaults below), and

    learning_rate: Adam learning rate for the autoencoder and the discriminator
      (taming-transformers' base rate with ``scale_lr`` is 4.5e-6).
    adam_betas: (0.5, 0.9) as in VQGAN.
    image_every: steps between reconstruction grids of held-out images (OUTPUT_DIR/images and
      the tracker).
    validation_steps / validation_size: the validation loss is the reconstruction loss as
      trained (``loss``'s pixel + perceptual terms) on up to validation_size images of the
      ``validation`` part, model in eval mode; OUTPUT_DIR/tokenizer-best is the export of the
      lowest.
    init_from: start from an exported tokenizer's weights: a tokenizer folder (OUTPUT_DIR/
      tokenizer of a stage-one run), a run folder or a pipeline folder (its vqvae); the
      ``model`` section must build the same architecture.
    """

    max_steps: int = 10000
    batch_size: int = 8
    learning_rate: float = 4.5e-6
    adam_betas: tuple[float, float] = (0.5, 0.9)
    image_every: int = 500

    def __post_init__(self):
        super().__post_init__()
        require(self.image_every >= 1, "train.image_every", self.image_every, "must be >= 1")


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
            len(model.get("ch_mult", [1])) >= 1 and all(m >= 1 for m in model.get("ch_mult", [1])),
            "model.ch_mult",
            model.get("ch_mult"),
            "one multiplier >= 1 per level, at least one (e.g. [1, 2, 2])",
        )
        require(
            all(r >= 1 for r in model.get("attn_resolutions", [])),
            "model.attn_resolutions",
            model.get("attn_resolutions"),
            "feature-map sides >= 1 (or [] for attention in the middle block only)",
        )
        require(
            0 <= model.get("dropout", 0.0) < 1,
            "model.dropout",
            model.get("dropout"),
            "must be in [0, 1)",
        )
        require(
            model.get("scaling_factor", 1.0) > 0,
            "model.scaling_factor",
            model.get("scaling_factor"),
            "must be > 0 (stage two measures it)",
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
    """Train, checkpoint, validate, and export ``output_dir/tokenizer`` (the last weights) and
    ``output_dir/tokenizer-best`` (the lowest validation loss); returns the first."""
    train = config.train
    check_source_exists(config.data)  # before anything is built (configs may name absent data)
    output_dir = Path(output_dir)
    accelerator = start_accelerator(train, output_dir)
    with accelerator.local_main_process_first():  # it lists the data once per machine
        train_set = build_dataset(config.data, "train")
        val_set = build_dataset(config.data, "validation")
    accelerator.print(describe_parts(config.data, len(train_set), len(val_set)))
    # the images it trains on and holds out: stage two reads the same by default
    model = VQTokenizer(**{**config.model, "training_data": image_choice(config.data)})
    if train.init_from:
        accelerator.print(f"weights from {init_from(model, train.init_from, INIT_FOLDERS)}")
    if train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    loss_fn = VQGANLoss(config.loss).to(accelerator.device)  # fails fast without VGG weights
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
    held_out = range(min(train.validation_size, len(val_set)))
    fixed = torch.stack([val_set[i]["pixel_values"] for i in held_out[:8]])
    batches = run.batches(train_set)
    for step in run.steps():
        for _ in range(train.gradient_accumulation_steps):
            x = next(batches)["pixel_values"].to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(*trained):
                out = model(x)
                with accelerator.autocast():
                    g_loss, logs = loss_fn.generator_loss(
                        x, out.sample, out.quantized.loss, unwrapped.last_layer, step
                    )
                accelerator.backward(g_loss)
                if not run.check_finite(g_loss):
                    opt_g.zero_grad(set_to_none=True)
                    break
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
        if run.is_due(train.log_every):
            logs.update(usage_and_perplexity(accelerator, out.quantized.counts))
            run.log(logs, show=("total", "nll", "usage", "perplexity"))
        if run.is_due(train.validation_steps):
            scores = validate(accelerator, unwrapped, loss_fn, val_set, held_out, train.batch_size)
            if run.record_validation(scores, "validation/nll") and accelerator.is_main_process:
                weights = unwrapped.state_dict()
                export(output_dir / "tokenizer-best", unwrapped.save_pretrained, weights)
        if accelerator.is_main_process and run.is_due(train.image_every):
            run.log_image("reconstructions", _reconstructions(unwrapped, fixed), len(fixed))

    replicas = {f"model.{k}": v for k, v in unwrapped.state_dict().items()}
    if opt_d is not None:
        discriminator = accelerator.unwrap_model(loss_fn.discriminator)
        # DDP broadcasts buffers (BatchNorm statistics) from process 0 before every forward, so
        # after the last one each process holds its own; do that broadcast once more
        for buffer in discriminator.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))
        replicas.update({f"discriminator.{k}": v for k, v in discriminator.state_dict().items()})
    check_replicas_agree(accelerator, replicas)
    last = output_dir / "tokenizer"
    if accelerator.is_main_process:
        export(last, unwrapped.save_pretrained, unwrapped.state_dict())
        skipped = sorted(set(train_set.skipped) | set(val_set.skipped))
        if skipped:
            accelerator.print(f"{len(skipped)} unreadable file(s) were skipped, e.g. {skipped[:3]}")
        accelerator.print(f"tokenizer exported to {last} (best validation: {last}-best)")
    accelerator.end_training()
    return last


def usage_and_perplexity(accelerator, counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codebook usage (fraction of codes hit) and perplexity of the code counts summed over the
    processes, as 0-d tensors on the device."""
    counts = accelerator.reduce(counts.float(), reduction="sum")
    p = counts / counts.sum()
    return {
        "usage": (counts > 0).float().mean(),
        "perplexity": torch.exp(-(p * p.clamp(min=1e-10).log()).sum()),
    }


@torch.no_grad()
def validate(accelerator, model, loss_fn, dataset, held_out, batch_size) -> dict[str, float]:
    """The reconstruction loss as trained (pixel + perceptual: ``nll``), PSNR, and the codebook
    usage and perplexity on the ``held_out`` items of ``dataset``, each process taking every
    N-th, in eval mode (the quantizer's state is left alone)."""
    mine = list(held_out)[accelerator.process_index :: accelerator.num_processes]
    sums = torch.zeros(3, device=accelerator.device)  # nll · n, squared error sum, n
    counts, pixels = None, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), batch_size):
        x = torch.stack([dataset[i]["pixel_values"] for i in mine[start : start + batch_size]])
        x = x.to(accelerator.device)
        with accelerator.autocast():
            out = model(x)
            _, logs = loss_fn.generator_loss(x, out.sample, out.quantized.loss, None, step=-1)
        error = (out.sample.float().clamp(-1, 1) - x).div(2).pow(2)  # on [0, 1] pixels
        sums += torch.stack([logs["nll"] * len(x), error.sum(), sums.new_tensor(len(x))]).to(sums)
        pixels = error[0].numel()
        c = out.quantized.counts.float()
        counts = c if counts is None else counts + c
    model.train(was_training)
    if counts is None:  # more processes than held-out images
        counts = torch.zeros(model.vector_quantizer.num_codes, device=accelerator.device)
    sums = accelerator.reduce(sums, reduction="sum")
    pixels = int(accelerator.reduce(torch.tensor(pixels, device=sums.device), "max"))
    n = sums[2].clamp(min=1)
    code = usage_and_perplexity(accelerator, counts)
    return {
        "validation/nll": (sums[0] / n).item(),
        "validation/psnr": (-10 * torch.log10(sums[1] / (n * pixels))).item(),
        "validation/usage": code["usage"].item(),
        "validation/perplexity": code["perplexity"].item(),
    }


@torch.no_grad()
def _reconstructions(model: VQTokenizer, images: torch.Tensor) -> torch.Tensor:
    """Originals (top row) over reconstructions (bottom row), in [0, 1]."""
    was_training = model.training
    model.eval()
    images = images.to(model.device)
    recon = model(images).sample
    model.train(was_training)
    return torch.cat([images, recon.to(images.dtype)]).clamp(-1, 1) * 0.5 + 0.5
