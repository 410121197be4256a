"""What a trained pipeline folder carries besides diffusers' files: the training configs of both
stages (``training_config.yaml``) and the model card (``README.md``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from engine.config import parse_yaml

from .class_conditional import ClassConditionalLatentDiffusionPipeline
from .common import TRAINING_CONFIG
from .model_card import write_model_card
from .unconditional import LatentDiffusionPipeline


def describe_export(
    export: str | Path,
    config: dict,
    tokenizer_dir: str | Path,
    conditional: bool,
    repo_id: str | None = None,
) -> None:
    """Write into the pipeline folder ``export`` the diffusion ``config`` (a mapping, as run)
    and the tokenizer's (``config.yaml`` of the run folder around ``tokenizer_dir``, if there is
    one) as ``training_config.yaml``, read by ``scripts/sample.py`` and ``scripts/eval_fid.py``
    for their defaults, and the model card, whose loading snippet names ``repo_id`` (else the
    folder)."""
    export, tokenizer_config = Path(export), Path(tokenizer_dir).parent / "config.yaml"
    configs = {
        "diffusion": config,
        "tokenizer": (
            parse_yaml(tokenizer_config.read_text()) if tokenizer_config.is_file() else None
        ),
    }
    (export / TRAINING_CONFIG).write_text(yaml.safe_dump(configs, sort_keys=False))
    cls = ClassConditionalLatentDiffusionPipeline if conditional else LatentDiffusionPipeline
    write_model_card(export, cls.__name__, configs, conditional, repo_id)
