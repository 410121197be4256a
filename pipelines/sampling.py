"""Reproducible sampling from a saved pipeline, shared by ``scripts/sample.py`` and
``scripts/eval_fid.py``: image ``i`` is drawn from its own seed ``seed + i`` (noise and, for
class-conditional pipelines, a uniform label), so the images do not depend on the batch size or on
how many processes share the work."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.config import parse_yaml

from .class_conditional import ClassConditionalLatentDiffusionPipeline
from .common import TRAINING_CONFIG
from .unconditional import LatentDiffusionPipeline

# precision names → torch dtypes: eval_fid.py's --dtype, a latent cache's cache.dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PIPELINES = {
    cls.__name__: cls for cls in (LatentDiffusionPipeline, ClassConditionalLatentDiffusionPipeline)
}


def load_pipeline(path: str | Path, torch_dtype: torch.dtype | None = None):
    """A folder written by ``train_diffusion.py`` (or ``save_pretrained``), loaded through the
    installed class (no code from the folder runs), in ``torch_dtype`` if given (the tokenizer's
    codebook stays float32). ``ValueError`` naming the fix otherwise."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"--pipeline {path}: not a saved pipeline folder (no model_index.json); "
            "pass the DIR/pipeline folder written by train_diffusion.py"
        )
    name = json.loads(index.read_text())["_class_name"]
    name = name[-1] if isinstance(name, list) else name
    if name not in PIPELINES:
        raise ValueError(
            f"--pipeline {path}: unknown pipeline class {name!r}; expected one of "
            f"{sorted(PIPELINES)}"
        )
    if torch_dtype is None:
        return PIPELINES[name].from_pretrained(path)
    with warnings.catch_warnings():  # diffusers >= 0.36 prefers dtype=; older ones know only this
        warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
        return PIPELINES[name].from_pretrained(path, torch_dtype=torch_dtype)


def training_config(path: str | Path) -> dict:
    """The diffusion config a pipeline folder was trained with: its ``training_config.yaml``,
    else the ``config.yaml`` of the run folder around it, else {}."""
    path = Path(path)
    if (path / TRAINING_CONFIG).is_file():
        return parse_yaml((path / TRAINING_CONFIG).read_text())["diffusion"] or {}
    if (path.parent / "config.yaml").is_file():
        return parse_yaml((path.parent / "config.yaml").read_text()) or {}
    return {}


def is_conditional(pipe) -> bool:
    return isinstance(pipe, ClassConditionalLatentDiffusionPipeline)


def image_labels(
    ids: Sequence[int], seed: int, num_classes: int, given: Sequence[int] | None = None
) -> list[int]:
    """Labels of images ``ids``: ``given`` cycled over the images, else uniform in
    [0, num_classes) drawn from each image's own seed."""
    if given:
        return [int(given[i % len(given)]) for i in ids]
    return [
        int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(seed + i)))
        for i in ids
    ]


def class_label_ids(pipe, text: str) -> list[int]:
    """``--class-labels``: comma-separated class ids or class names, or both mixed (``3,1``,
    ``tench,goldfish``) → class ids, a name being looked up with the pipeline's
    ``get_label_ids`` (an integer is an id). ValueError naming unknown names or ids out of
    range."""
    items = [item.strip() for item in text.split(",")]
    names = [item for item in items if not re.fullmatch(r"-?\d+", item)]
    named = dict(zip(names, pipe.get_label_ids(names))) if names else {}
    ids = [named[item] if item in named else int(item) for item in items]
    bad = [i for i in ids if not 0 <= i < pipe.num_classes]
    if bad:
        raise ValueError(
            f"class ids {bad} are out of range: this model has {pipe.num_classes} classes, ids "
            f"must be in [0, {pipe.num_classes})"
        )
    return ids


def sample_images(
    pipe,
    ids: Sequence[int],
    *,
    seed: int,
    steps: int,
    eta: float = 0.0,
    guidance_scale: float = 1.5,
    labels: Sequence[int] | None = None,
    output_type: str = "pt",
):
    """Images ``ids`` (one generator each, on the pipeline's device); ``labels`` for a
    class-conditional pipeline. Returns what the pipeline returns for ``output_type``."""
    device = pipe._execution_device
    generators = [torch.Generator(device).manual_seed(seed + i) for i in ids]
    if is_conditional(pipe):
        if labels is None or len(labels) != len(ids):
            raise ValueError("a class-conditional pipeline needs one label per image")
        return pipe(
            list(labels),
            guidance_scale=guidance_scale,
            num_inference_steps=steps,
            eta=eta,
            generator=generators,
            output_type=output_type,
        ).images
    return pipe(
        batch_size=len(ids),
        num_inference_steps=steps,
        eta=eta,
        generator=generators,
        output_type=output_type,
    ).images
