"""``RunConfig``: the ``train`` keys both trainers share (each trainer's ``train`` section adds
its own), checked before anything is built."""

from __future__ import annotations

from dataclasses import dataclass

from .accelerator import REPORT_TO
from .config import check_types, require


@dataclass
class RunConfig:
    """The ``train`` keys both trainers share (each trainer's ``train`` section adds its own).

    max_steps: optimizer steps to train for.
    batch_size: items per process per micro-batch.
    learning_rate: the optimizer's learning rate; scale_lr multiplies it by batch_size ×
      gradient_accumulation_steps × processes (taming-transformers' and LDM's rule).
    adam_betas: the optimizer's betas.
    max_grad_norm: clip the trained model's gradient norm to this (null: no clipping).
    gradient_accumulation_steps, mixed_precision ("no" | "fp16" | "bf16"): null (the default)
      takes them from the launcher (``accelerate launch --mixed_precision bf16``, ``accelerate
      config``); a value here wins over the launcher's, with a warning when they differ.
    gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more
      time), as diffusers' ``enable_gradient_checkpointing``.
    allow_tf32: TF32 matrix products and convolutions on Ampere and later GPUs (diffusers'
      ``--allow_tf32``; the quantizer's search stays exact float32 either way).
    seed: seeds weights, data order and every random draw; a resumed run continues the stream.
    num_workers: DataLoader worker processes.
    report_to: the tracker, as in diffusers' examples: "tensorboard", "wandb", any other
      accelerate tracker, "all" (every installed one) or "none"; logs in OUTPUT_DIR/logs, the
      resolved config as the run's hyperparameters.
    log_every: steps between logged training losses.
    validation_steps: steps between validation losses on held-out data (and at the end); the
      best one's export is kept in OUTPUT_DIR/<export>-best beside the last.
    validation_size: at most this many held-out items per validation.
    checkpointing_steps: steps between checkpoints (OUTPUT_DIR/checkpoint-N), atomic and
      verified; ``--resume_from_checkpoint latest`` continues from the newest sound one.
    checkpoints_total_limit: how many checkpoints to keep (null: all).
    max_nonfinite_steps: a non-finite loss skips its step; this many in a row stop the run.
    init_from: start from exported weights (fine-tuning): a trainer-specific folder, see its
      ``train`` section; ignored when the run resumes from a checkpoint.
    """

    max_steps: int = 10000
    batch_size: int = 8
    learning_rate: float = 1e-4
    scale_lr: bool = False
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = None
    gradient_accumulation_steps: int | None = None
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    seed: int = 0
    num_workers: int = 0
    report_to: str = "tensorboard"
    log_every: int = 10
    validation_steps: int = 1000
    validation_size: int = 256
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int | None = 3
    max_nonfinite_steps: int = 5
    init_from: str | None = None

    def __post_init__(self):
        check_types(self, "train")
        for key in (
            "max_steps",
            "batch_size",
            "log_every",
            "validation_steps",
            "validation_size",
            "checkpointing_steps",
            "max_nonfinite_steps",
        ):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")
        for key in ("gradient_accumulation_steps", "checkpoints_total_limit"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"train.{key}", value, "must be >= 1 or null")
        require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "train.max_grad_norm",
            self.max_grad_norm,
            "must be > 0 (clip the gradient norm to it) or null (no clipping)",
        )
        require(self.seed >= 0, "train.seed", self.seed, "must be >= 0")
        require(
            self.mixed_precision in (None, "no", "fp16", "bf16"),
            "train.mixed_precision",
            self.mixed_precision,
            'choose "no", "fp16", "bf16" or null (the launcher decides)',
        )
        require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "train.adam_betas",
            self.adam_betas,
            "two numbers in [0, 1)",
        )
        require(self.num_workers >= 0, "train.num_workers", self.num_workers, "must be >= 0")
        require(
            self.report_to in REPORT_TO,
            "train.report_to",
            self.report_to,
            f"choose one of {list(REPORT_TO)}",
        )
