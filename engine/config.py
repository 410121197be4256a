"""YAML configs: loading, dotted ``key=value`` overrides, and validation that names the bad key
before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or has an impossible value."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true / false. YAML 1.1 also reads
    yes / no / on / off as booleans, so ``mixed_precision: no`` would arrive as False."""


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str):
    """YAML text as Python data, with YAML 1.2 booleans (``no`` is the string "no")."""
    return yaml.load(text, Loader=_Yaml12Loader)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:  # a syntax error, or a tag such as !!python/object
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix that line") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML: ``train.lr=1e-4``,
    ``model.ch_mult=[1,2,2]``). Unknown keys are caught later by validation."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = parse_yaml(raw)
    return config


def load_config(path: str | Path, overrides: list[str], cls: type[C]) -> C:
    """The config ``cls`` of the YAML at ``path`` with ``overrides`` applied."""
    return from_mapping(cls, apply_overrides(load_yaml(path), overrides))


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _accepts_float(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def check_section(section: str, given: Any, hints: dict[str, Any]) -> dict:
    """Check that ``given`` (a mapping) only has keys of ``hints`` with values of those types.
    Returns a copy in which numeric strings for float keys are converted (YAML reads ``1e-4``
    without a dot as a string)."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"section {section!r} must be a mapping, got {type(given).__name__}")
    given = dict(given)
    for key, value in given.items():
        if isinstance(value, str) and key in hints and _accepts_float(hints[key]):
            try:
                given[key] = value = float(value)
            except ValueError:
                pass
        if key not in hints:
            raise ConfigError(unknown_key(f"{section}.{key}", hints))
        if not _matches(value, hints[key]):
            raise ConfigError(
                f"{section}.{key} = {value!r} has the wrong type; expected {_describe(hints[key])}"
            )
        _check_finite(f"{section}.{key}", value)
    return given


def _check_finite(key: str, value: Any) -> None:
    """No config value is infinite or NaN (``.inf`` is never what a run needs)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise ConfigError(f"{key} = {value!r} is not allowed; it must be a finite number")


# what diffusers' training scripts (train_unconditional.py, train_text_to_image.py, the VQGAN
# example) call the keys of ours: an unknown key that is one of them gets ours in its message
DIFFUSERS_NAMES = {
    "dataset_name": "data.source",
    "train_data_dir": "data.source",
    "dataset_config_name": "data.dataset_config_name",
    "resolution": "data.resolution and model.resolution",
    "center_crop": "data.crop",
    "random_flip": "data.flip",
    "train_batch_size": "train.batch_size",
    "max_train_steps": "train.max_steps",
    "num_train_epochs": "train.max_steps",
    "adam_beta1": "train.adam_betas",
    "adam_beta2": "train.adam_betas",
    "adam_weight_decay": "train.weight_decay",
    "dataloader_num_workers": "train.num_workers",
    "ema_max_decay": "train.ema_decay",
    "ema_inv_gamma": "train.ema_power",
    "use_ema": "train.ema_decay (the EMA is always on)",
    "validation_epochs": "train.validation_steps",
    "save_images_epochs": "train.sample_every",
    "ddpm_num_inference_steps": "train.sample_steps",
    "output_dir": "the --output_dir option",
    "logging_dir": "OUTPUT_DIR/logs (fixed)",
    "resume_from_checkpoint": "the --resume_from_checkpoint option",
    "checkpoints_total_limit": "train.checkpoints_total_limit",
    "lr_scheduler": "train.lr_scheduler",
    "lr_warmup_steps": "train.lr_warmup_steps",
    "mixed_precision": "train.mixed_precision",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
}


def unknown_key(key: str, allowed: Any) -> str:
    """The message for an unknown ``section.key``: a renamed key's new name, diffusers' name's
    equivalent, or the closest allowed key, and the allowed keys."""
    name = key.rsplit(".", 1)[-1]
    if key in RENAMED:
        hint = f"renamed {RENAMED[key]}; "
    elif name in DIFFUSERS_NAMES and not key.endswith(DIFFUSERS_NAMES[name]):
        hint = f"diffusers' {name!r} is {DIFFUSERS_NAMES[name]} here; "
    else:
        close = difflib.get_close_matches(name, sorted(allowed), n=1)
        hint = f"did you mean {key.rsplit('.', 1)[0]}.{close[0]}? " if close else ""
    return f"unknown key {key}; {hint}allowed keys: {sorted(allowed)}"


def dataclass_hints(cls: type) -> dict[str, Any]:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


def signature_hints(fn: Callable, skip: tuple[str, ...] = ("self", "return")) -> dict[str, Any]:
    return {k: v for k, v in typing.get_type_hints(fn).items() if k not in skip}


# keys of older recipes → their names now (diffusers' training examples' names)
RENAMED = {
    "train.checkpoint_every": "train.checkpointing_steps",
    "train.keep_checkpoints": "train.checkpoints_total_limit",
    "train.warmup_steps": "train.lr_warmup_steps",
}


def from_mapping(cls: type[C], given: Any, section: str = "") -> C:
    """The config dataclass ``cls`` from a mapping: a YAML section, or a whole YAML file whose
    sections are ``cls``'s dataclass fields (built the same way; a plain ``dict`` field is taken
    as it is). Unknown keys are refused naming the key and what is allowed; the dataclass checks
    its own types and values in ``__post_init__`` (:func:`check_types`, :func:`require`). The
    keys the mapping set are kept in the result's ``given`` attribute (the others are defaults).
    """
    hints = dataclass_hints(cls)
    given = {} if given is None else given
    if not isinstance(given, dict):
        what = f"section {section!r}" if section else "a config"
        raise ConfigError(f"{what} must be a mapping, got {type(given).__name__}")
    unknown = sorted(set(given) - set(hints))
    if unknown and not section:
        names = [DIFFUSERS_NAMES.get(u) for u in unknown]
        hint = "".join(f" ({u!r} is {n} here)" for u, n in zip(unknown, names) if n)
        raise ConfigError(f"unknown section(s) {unknown}{hint}; allowed sections: {list(hints)}")
    if unknown:
        raise ConfigError(unknown_key(f"{section}.{unknown[0]}", hints))
    if not section:
        for name, value in given.items():
            if not dataclasses.is_dataclass(hints[name]) and not isinstance(value, dict | None):
                raise ConfigError(
                    f"section {name!r} must be a mapping of keys to values, got "
                    f"{type(value).__name__} {value!r}"
                )
        given = {
            name: from_mapping(hint, given.get(name), name)
            if dataclasses.is_dataclass(hint)
            else dict(given.get(name) or {})
            for name, hint in hints.items()
        }
    try:
        config = cls(**given)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{section}: {e}" if section else str(e)) from None
    config.__dict__["given"] = frozenset(given)  # the keys the file set (not a field)
    return config


def check_types(config: Any, section: str) -> None:
    """Check each field of the config dataclass ``config`` against its type hint, naming
    ``section.key``; numeric strings in float fields become floats (YAML reads ``1e-4``, without
    a dot, as a string). Every config dataclass calls it first in its ``__post_init__``."""
    for name, hint in dataclass_hints(type(config)).items():
        value = getattr(config, name)
        if isinstance(value, str) and _accepts_float(hint):
            try:
                value = float(value)
                setattr(config, name, value)
            except ValueError:
                pass
        if not _matches(value, hint):
            raise ConfigError(
                f"{section}.{name} = {value!r} has the wrong type; expected {_describe(hint)}"
            )
        _check_finite(f"{section}.{name}", value)


def to_mapping(config: Any) -> dict:
    """A config dataclass as plain YAML-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming ``key``, its ``value`` and what is ``allowed``."""
    if not condition:
        raise ConfigError(f"{key} = {value!r} is not allowed; {allowed}")
