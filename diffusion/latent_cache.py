"""Stage two's latent cache: the frozen tokenizer encodes one dataset part once into sharded
safetensors files, and the diffusion model trains on :class:`LatentCache`.

A cache folder holds::

    shard-00000.safetensors  items [0, shard_size): "latents" (n×C×h×w float32), "labels" (n int64)
    shard-00001.safetensors  items [shard_size, 2·shard_size), ...
    pending.json             the build settings, written first (marks a partial cache)
    metadata.json            written atomically last (marks a complete cache; pending.json goes)

Item order: the dataset part in its own order (items 0..N-1); with ``flips`` the horizontally
flipped images follow in the same order (item N + i is item i mirrored), 2N items in all.
Builds are resumable (finished shards are kept) but one cache folder takes one build at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from tokenizer.data import PARTS, DataConfig, build_dataset
from tokenizer.model import VQTokenizer

FORMAT = 1
METADATA, PENDING = "metadata.json", "pending.json"
SETTINGS = ("format", "tokenizer_fingerprint", "data", "part", "quantized", "flips")


class StaleCacheError(RuntimeError):
    """The cache folder holds a (complete or partial) cache built with other settings."""


def _tokenizer_config(tokenizer: VQTokenizer) -> dict[str, Any]:
    """The JSON config that decides the latents: no private keys, no ``scaling_factor``."""
    config = {key: value for key, value in dict(tokenizer.config).items()
              if not key.startswith("_") and key != "scaling_factor"}
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def tokenizer_fingerprint(tokenizer: VQTokenizer) -> str:
    """SHA-256 of the tokenizer's config (less ``scaling_factor``) and of every state_dict
    tensor (name, dtype, shape, bytes, in sorted name order)."""
    digest = hashlib.sha256(json.dumps(_tokenizer_config(tokenizer), sort_keys=True).encode())
    for name, tensor in sorted(tokenizer.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{list(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _data_config(config: DataConfig | Mapping[str, Any], part: str) -> DataConfig:
    """``config`` as a DataConfig with fixed views (no random flip, center crop)."""
    if isinstance(config, Mapping):
        allowed = [f.name for f in dataclasses.fields(DataConfig)]
        unknown = [key for key in config if key not in allowed]
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; allowed keys: {allowed}")
        config = DataConfig(**config)
    elif not isinstance(config, DataConfig):
        raise TypeError(f"data_config must be a DataConfig or a dict, got {type(config).__name__}")
    if part == "train" and (config.flip or config.crop == "random"):
        warnings.warn("the latent cache stores fixed views: data.flip and random crops are "
                      "ignored (center crop); pass flips=True to cache mirrored copies",
                      stacklevel=3)
    return dataclasses.replace(config, flip=False, crop="center")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a cache's settings and the requested ones (cache value first)."""
    diffs: list[str] = []
    for key in SETTINGS:
        a, b = old.get(key), new[key]
        if a == b:
            continue
        if key == "data" and isinstance(a, dict):
            diffs += [f"data.{k} {a.get(k)!r} vs {b[k]!r}" for k in b if a.get(k) != b[k]]
        elif key == "tokenizer_fingerprint":
            a_cfg, b_cfg = old.get("tokenizer_config") or {}, new["tokenizer_config"]
            changed = [f"tokenizer.{k} {a_cfg.get(k)!r} vs {b_cfg.get(k)!r}"
                       for k in sorted(set(a_cfg) | set(b_cfg)) if a_cfg.get(k) != b_cfg.get(k)]
            diffs += changed or ["tokenizer weights differ"]
        else:
            diffs.append(f"{key} {a!r} vs {b!r}")
    return diffs


def _stale(root: Path, what: str) -> StaleCacheError:
    return StaleCacheError(f"{root} holds {what}; delete {root} or choose another cache dir")


def _read_settings(root: Path) -> dict[str, Any] | None:
    """The settings of the cache in ``root`` (metadata.json, else pending.json), or None."""
    for name in (METADATA, PENDING):
        if (root / name).is_file():
            return json.loads((root / name).read_text())
    if any(root.glob("shard-*.safetensors")):
        raise _stale(root, f"latent shards without {PENDING} or {METADATA} (unknown settings)")
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _shard_ok(path: Path, size: int) -> bool:
    """Whether the finished shard ``path`` exists, loads and holds ``size`` items."""
    if not path.is_file():
        return False
    try:
        shard = load_file(path)
        problem = None if len(shard["latents"]) == len(shard["labels"]) == size else \
            f"it does not hold {size} items"
    except Exception as err:  # noqa: BLE001 - any failure means "re-encode it"
        problem = str(err)
    if problem:
        warnings.warn(f"re-encoding unreadable shard {path} ({problem})", stacklevel=3)
    return problem is None


@torch.no_grad()
def _encode_shards(tokenizer: VQTokenizer, dataset: Dataset, root: Path, shards: list[int],
                   count: int, shard_size: int, quantized: bool, batch_size: int,
                   num_workers: int, device: torch.device) -> None:
    """Encode and write ``shards`` (item j is dataset item j % N, mirrored when j >= N)."""
    n, dtype = len(dataset), next(tokenizer.parameters()).dtype
    chunks = [range(s, min(s + batch_size, (k + 1) * shard_size, count))
              for k in shards for s in range(k * shard_size, min((k + 1) * shard_size, count),
                                             batch_size)]
    loader = DataLoader(dataset, batch_sampler=[[j % n for j in c] for c in chunks],
                        num_workers=num_workers)
    latents: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []  # of the shard being encoded
    for chunk, batch in zip(chunks, loader):
        x = batch["pixel_values"].to(device, dtype)
        mirror = torch.tensor([j >= n for j in chunk], device=device).view(-1, 1, 1, 1)
        h = tokenizer.encode(torch.where(mirror, x.flip(-1), x)).latents
        latents.append((tokenizer.quantize(h).z_q if quantized else h).float().cpu())
        labels.append(batch["label"].long())
        if chunk.stop % shard_size == 0 or chunk.stop == count:  # the shard is done
            path = root / _shard_name(chunk.start // shard_size)
            tmp = path.with_name(path.name + ".tmp")
            save_file({"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels)},
                      tmp)
            os.replace(tmp, path)  # a killed run never leaves a half shard under the real name
            latents, labels = [], []


def build_latent_cache(tokenizer: VQTokenizer, data_config: DataConfig | Mapping[str, Any],
                       cache_dir: str | os.PathLike, *, part: str = "train",
                       quantized: bool = True, flips: bool = False, batch_size: int = 64,
                       shard_size: int = 4096, accelerator: Accelerator | None = None,
                       num_workers: int = 0) -> LatentCache:
    """Encode ``part`` of the data into ``cache_dir`` (or reuse the complete cache there) and
    open it on every process.

    ``quantized``: cache z_q (default) or the pre-quantization latents. ``flips``: also cache
    every image mirrored (see the module docstring for the order). Random data augmentations
    (``flip``, random ``crop``) are replaced by fixed views. A cache of other settings raises
    :class:`StaleCacheError`. With an ``accelerator`` of N processes, process r encodes the
    shards k with k % N == r; a restarted build only encodes the missing shards. Encoding runs
    in eval mode without gradients on ``accelerator.device`` (the tokenizer is moved there) or
    on the tokenizer's device."""
    if part not in PARTS or min(batch_size, shard_size) < 1:
        raise ValueError(f"need part in {PARTS} and batch_size, shard_size >= 1; got {part!r}, "
                         f"{batch_size}, {shard_size}")
    root, config = Path(cache_dir), _data_config(data_config, part)
    settings = {"format": FORMAT, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "tokenizer_config": _tokenizer_config(tokenizer),
                "data": dataclasses.asdict(config), "part": part, "quantized": bool(quantized),
                "flips": bool(flips)}
    previous = _read_settings(root)
    if previous is not None:
        diffs = _differences(previous, settings)
        if diffs:
            raise _stale(root, "a latent cache built with other settings (cache vs requested: "
                         + "; ".join(diffs) + ")")
        if previous.get("complete"):
            return LatentCache(root)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    barrier = accelerator.wait_for_everyone if accelerator else lambda: None
    dataset = build_dataset(config, part)
    count = len(dataset) * (2 if flips else 1)
    if previous is not None:
        if previous["count"] != count:
            raise _stale(root, f"a partial cache of {previous['count']} items, not {count} "
                               f"(the data changed)")
        if previous["shard_size"] != shard_size:
            warnings.warn(f"resuming {root} with its shard_size {previous['shard_size']} "
                          f"(not {shard_size})", stacklevel=2)
            shard_size = previous["shard_size"]
    barrier()  # every process has read the folder before it changes
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / PENDING, {**settings, "count": count, "shard_size": shard_size})
    barrier()
    names = [_shard_name(k) for k in range(math.ceil(count / shard_size))]
    todo = [k for k in range(rank, len(names), world)
            if not _shard_ok(root / names[k], min(shard_size, count - k * shard_size))]
    if todo:
        device = accelerator.device if accelerator else next(tokenizer.parameters()).device
        was_training = tokenizer.training
        tokenizer.to(device).eval()
        try:
            _encode_shards(tokenizer, dataset, root, todo, count, shard_size, quantized,
                           batch_size, num_workers, device)
        finally:
            tokenizer.train(was_training)
    barrier()
    if rank == 0:
        labels, shape = [], None
        for name in names:
            with safe_open(root / name, framework="pt") as shard:
                shape = shape or list(shard.get_slice("latents").get_shape()[1:])
                labels.append(shard.get_tensor("labels"))
        all_labels = torch.cat(labels)
        has_labels = bool((all_labels >= 0).any())
        _write_json(root / METADATA, {
            **settings, "dataset_size": len(dataset), "latent_shape": shape, "count": count,
            "shard_size": shard_size, "shards": names, "dtype": "float32",
            "has_labels": has_labels,
            "num_classes": int(all_labels.max()) + 1 if has_labels else 0, "complete": True})
        (root / PENDING).unlink(missing_ok=True)
    barrier()
    return LatentCache(root)


class LatentCache(Dataset):
    """A complete latent cache; items are ``{"latents": C×h×w float32, "label": int64 scalar}``.

    All shards are loaded into memory when the cache is opened (``latents``: count×C×h×w,
    ``labels``: count), with ``safetensors.torch.load_file`` only; ``metadata`` is the parsed
    metadata.json."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.root = Path(cache_dir)
        path = self.root / METADATA
        metadata = json.loads(path.read_text()) if path.is_file() else {}
        if not metadata.get("complete"):
            raise FileNotFoundError(
                f"{self.root} is not a complete latent cache (no complete {METADATA}); build "
                f"one with diffusion.latent_cache.build_latent_cache(tokenizer, data_config, "
                f"{str(self.root)!r})")
        self.metadata: dict[str, Any] = metadata
        shards = [load_file(self.root / name) for name in metadata["shards"]]
        self.latents = torch.cat([shard["latents"] for shard in shards])
        self.labels = torch.cat([shard["labels"] for shard in shards])
        expected = [metadata["count"], *metadata["latent_shape"]]
        if list(self.latents.shape) != expected or len(self.labels) != metadata["count"]:
            raise ValueError(f"{self.root} is damaged: its shards hold latents of shape "
                             f"{list(self.latents.shape)}, metadata says {expected}; delete "
                             f"it and build it again")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[i], "label": self.labels[i]}


def measure_scaling_factor(cache: LatentCache, max_items: int | None = None) -> float:
    """1 / std of all latent values (LDM's rule; unbiased std in float64), over every item or,
    with ``max_items``, over every k-th item (k = ceil(count / max_items))."""
    latents = cache.latents
    if max_items is not None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        latents = latents[::math.ceil(len(latents) / max_items)]
    std = latents.double().std().item()
    if not std > 0:
        raise ValueError(f"the latents of {cache.root} have std {std}; no scaling factor")
    return 1.0 / std
