"""The FID report of ``scripts/eval_fid.py``: the protocol chosen from the options and the
config the pipeline was trained with, the samples' and the reference's features
(:mod:`diffusion.evaluate`), the metrics, and every setting that produced them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import diffusers
import torch
from accelerate import Accelerator

from diffusion.evaluate import (
    NO_WEIGHTS,
    EvalConfig,
    file_digest,
    folder_digest,
    generated_features,
    reference_features,
)
from engine.config import ConfigError, from_mapping
from engine.data import DataConfig
from engine.fid import class_averaged_fid, fidelity_metrics, load_inception
from pipelines.sampling import (
    DTYPES,
    is_conditional,
    load_pipeline,
    training_config,
)


@dataclass
class FIDOptions:
    """What ``scripts/eval_fid.py``'s options choose (see its ``--help``); None leaves the choice
    to the config the pipeline was trained with: its ``eval`` section (the protocol:
    ``EvalConfig``) and its ``data`` section (the reference images)."""

    pipeline: str  # the folder written by train_diffusion.py
    reference: str | None = None  # reference data source
    reference_part: str | None = None
    reference_images: int | str | None = None  # at most this many, or "all"
    num_samples: int | None = None
    batch_size: int = 32
    steps: int | None = None
    eta: float | None = None
    guidance_scale: float | None = None
    class_labels: str | Sequence[int] | None = None  # cycled over the samples (else uniform)
    seed: int = 0  # sample i uses seed + i
    dtype: str = "float32"  # a name of pipelines.sampling.DTYPES
    inception_weights: str | None = None
    kid: bool = False
    isc: bool = False
    prc: bool = False
    per_class: bool = False
    save_samples: str | None = None  # also write the samples as PNGs here
    cache_dir: str | None = None  # reference feature cache
    refresh_reference: bool = False


class EvaluationError(Exception):
    """Why a pipeline cannot be scored, found before any sampling where it can be: the message,
    and ``status``, the exit status of ``scripts/eval_fid.py`` (``NO_WEIGHTS``: no Inception
    weights)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def fid_report(options: FIDOptions, accelerator: Accelerator | None = None) -> dict | None:
    """Score the pipeline of ``options``: the report (metrics, every sampling setting, the
    reference's key and preprocessing, the pipeline's hash, timings, versions and the date) on
    the main process, None on the others (each draws its share of the samples).

    Raises :class:`EvaluationError` for a folder, option or protocol that cannot be used, and
    for missing Inception weights, all before any sampling; and for a class-averaged FID that
    cannot be computed."""
    accelerator = accelerator or Accelerator()
    try:
        pipe = load_pipeline(options.pipeline, DTYPES[options.dtype]).to(accelerator.device)
        trained = training_config(options.pipeline)
        config, steps, guidance = _protocol(options, trained, pipe)
        data = _reference_data(options, trained, pipe)
    except (ValueError, ConfigError) as e:
        raise EvaluationError(f"error: {e}") from e
    conditional = is_conditional(pipe)
    if not conditional and (options.class_labels or options.per_class):
        raise EvaluationError("--class-labels / --per-class: this pipeline is unconditional")
    class_labels = options.class_labels
    if isinstance(class_labels, str):
        class_labels = [int(c) for c in class_labels.split(",")]
    class_labels = list(class_labels) if class_labels else None
    try:  # before any sampling: a missing weights file costs seconds, not hours
        inception = load_inception(
            options.inception_weights, accelerator.device, logits=options.isc
        )
    except FileNotFoundError as e:
        raise EvaluationError(f"FID not computed: {e}", NO_WEIGHTS) from e
    pipe.set_progress_bar_config(disable=True)

    start = time.perf_counter()
    weights = f"{inception.weights_path.name}#{file_digest(inception.weights_path)}"
    reference = reference_features(
        data,
        config.reference_part,
        inception,
        accelerator,
        weights=weights,
        max_images=config.reference_images,
        batch_size=options.batch_size,
        cache_dir=options.cache_dir,
        refresh=options.refresh_reference,
    )
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    generated = generated_features(
        pipe,
        inception,
        accelerator,
        num_samples=config.num_samples,
        batch_size=options.batch_size,
        seed=options.seed,
        steps=steps,
        eta=config.eta,
        guidance_scale=guidance,
        class_labels=class_labels,
        save_dir=options.save_samples,
    )
    sampling_seconds = time.perf_counter() - start
    if not accelerator.is_main_process:
        return None

    metrics = fidelity_metrics(
        generated,
        reference.features,
        kid=options.kid,
        isc=options.isc,
        prc=options.prc,
        seed=options.seed,
        device=accelerator.device,  # precision/recall's distances
    )
    if options.per_class:
        try:
            metrics.update(
                class_averaged_fid(
                    generated["2048"], generated["labels"], reference.features, reference.labels
                )
            )
        except ValueError as e:
            raise EvaluationError(f"--per-class: {e}") from e
    import torch_fidelity  # for its version (imported when needed, as engine.fid does)

    return {
        "metrics": metrics,
        "sampling": {
            "num_samples": config.num_samples,
            "steps": steps,
            "eta": config.eta,
            "guidance_scale": guidance,
            "seed": options.seed,
            "class_labels": class_labels or ("uniform" if conditional else None),
            "scheduler": type(pipe.scheduler).__name__,
            "dtype": options.dtype,
        },
        "reference": {
            "key": reference.key,
            "images": len(reference.features),
            "cached": reference.cached,
            "cache_file": str(reference.path),
            **reference.spec,
        },
        "pipeline": {
            "path": str(options.pipeline),
            "class": type(pipe).__name__,
            "hash": folder_digest(options.pipeline),
        },
        "eval_config": asdict(config),
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "seconds": {
            "reference": round(reference_seconds, 2),
            "sampling_and_features": round(sampling_seconds, 2),
        },
        "seconds_per_1000_samples": 1000 * sampling_seconds / config.num_samples,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "torch_fidelity": torch_fidelity.__version__,
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _protocol(options: FIDOptions, trained: dict, pipe) -> tuple[EvalConfig, int, float | None]:
    """The eval settings: the training config's ``eval`` section, overridden by the options;
    the DDIM steps and (class-conditional pipelines) the guidance scale, which default to the
    training config's ``train.sample_steps`` and ``train.sample_guidance``."""
    config = from_mapping(EvalConfig, trained.get("eval"), "eval")
    given = {
        "num_samples": options.num_samples,
        "steps": options.steps,
        "eta": options.eta,
        "guidance_scale": options.guidance_scale,
        "reference_part": options.reference_part,
    }
    if options.reference_images is not None:
        given["reference_images"] = (
            None if options.reference_images == "all" else int(options.reference_images)
        )
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    train = trained.get("train") or {}
    steps = config.steps or int(train.get("sample_steps", 50))
    guidance = None
    if is_conditional(pipe):
        guidance = (
            config.guidance_scale
            if config.guidance_scale is not None
            else float(train.get("sample_guidance", 1.5))
        )
    return config, steps, guidance


def _reference_data(options: FIDOptions, trained: dict, pipe) -> DataConfig:
    """The training config's ``data`` section (read at the tokenizer's resolution and channels
    unless it says), with ``options.reference`` as its source if given."""
    data = dict(trained.get("data") or {})
    data.setdefault("resolution", pipe.vqvae.config.resolution)
    data.setdefault("channels", pipe.vqvae.config.in_channels)
    if options.reference:
        data["source"] = options.reference
    return from_mapping(DataConfig, data, "data")
