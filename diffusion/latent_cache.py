"""Stage two's latent cache: the frozen tokenizer encodes one dataset part once into sharded
safetensors files, and the diffusion model trains on :class:`LatentCache`, which memory-maps them.

A cache folder holds::

    shard-00000.safetensors  the readable images among images [0, S) of the part (S =
                             shard_size, or shard_size / 2 with flips): "latents" (n×C×h×w,
                             float32 / bfloat16 / float16), "labels" (n int64); its metadata
                             holds its image range, the names of its unreadable images and the
                             count, mean and sum of squared deviations of its latent values
    shard-00001.safetensors  the readable images among images [S, 2·S), ...
    pending.json             the build settings, written first (marks a partial cache)
    metadata.json            written atomically last (marks a complete cache; pending.json goes):
                             settings, items per shard, shapes, label range, the latents' mean
                             and std, and the unreadable images left out

Item order: the readable images of the part in its own order (an unreadable image is left out,
never replaced); with ``flips`` item 2i is readable image i and item 2i + 1 its mirror image
(both from one decode). Opening a cache reads metadata.json only; every process maps the shards
(the operating system shares their pages), so a cache costs each process a small constant,
whatever its size. Builds are resumable (finished shards are kept) but one cache folder takes
one build at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from engine.config import check_types, from_mapping, require
from engine.data import PARTS, DataConfig, ReadableItems, build_dataset, collate_readable
from engine.distributed import main_process_decides
from pipelines.sampling import DTYPES
from tokenizer.model import VQTokenizer

# 1: float32 only, mirror images in a second half, no statistics; 2: shards of shard_size items,
# an unreadable image replaced by the next one
FORMAT = 3
METADATA, PENDING = "metadata.json", "pending.json"
SETTINGS = (
    "format",
    "tokenizer_fingerprint",
    "data",
    "part",
    "quantized",
    "flips",
    "dtype",
    "precision",
)
# numpy has no bfloat16: its values are mapped as uint16 and reinterpreted by torch
_NUMPY = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "I64": np.int64}
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


@dataclass
class CacheConfig:
    """``cache`` section of a diffusion config: how :func:`build_latent_cache` encodes a part.

    dir: where the encoded latents go (default in training: OUTPUT_DIR/latents, and the
      validation part's beside it, DIR-validation). A cache built for another tokenizer or data
      config is refused, never reused.
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
            "with cache.flips, shard_size must be even (an image and its mirror image share a "
            "shard)",
        )
        require(self.dtype in DTYPES, "cache.dtype", self.dtype, f"choose one of {list(DTYPES)}")
        require(self.num_workers >= 0, "cache.num_workers", self.num_workers, "must be >= 0")


class StaleCacheError(RuntimeError):
    """The cache folder holds a (complete or partial) cache built with other settings."""


def _tokenizer_config(tokenizer: VQTokenizer) -> dict[str, Any]:
    """The JSON config that decides the latents: no private keys, no ``scaling_factor``."""
    config = {
        key: value
        for key, value in dict(tokenizer.config).items()
        if not key.startswith("_") and key != "scaling_factor"
    }
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
        config = from_mapping(DataConfig, dict(config), "data")
    elif not isinstance(config, DataConfig):
        raise TypeError(f"data_config must be a DataConfig or a dict, got {type(config).__name__}")
    require(
        not config.streaming,
        "data.streaming",
        config.streaming,
        "the latent cache reads every image of the part once anyway: set data.streaming: false",
    )
    if part == "train" and (config.flip or config.crop == "random"):
        warnings.warn(
            "the latent cache stores fixed views: data.flip and random crops are "
            "ignored (center crop); pass flips=True to cache mirrored copies",
            stacklevel=3,
        )
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
            changed = [
                f"tokenizer.{k} {a_cfg.get(k)!r} vs {b_cfg.get(k)!r}"
                for k in sorted(set(a_cfg) | set(b_cfg))
                if a_cfg.get(k) != b_cfg.get(k)
            ]
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


def _images_per_shard(shard_size: int, flips: bool) -> int:
    return shard_size // 2 if flips else shard_size


def _images(k: int, shard_size: int, flips: bool, images: int) -> range:
    """The images of the part (``images`` in all) that shard ``k`` covers."""
    step = _images_per_shard(shard_size, flips)
    return range(k * step, min((k + 1) * step, images))


def _shard_names(images: int, shard_size: int, flips: bool) -> list[str]:
    count = math.ceil(images / _images_per_shard(shard_size, flips))
    return [_shard_name(k) for k in range(count)]


def _shard_ok(path: Path, images: range) -> bool:
    """Whether the finished shard ``path`` exists, opens and is the one of ``images``."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as shard:
            sizes = {shard.get_slice(k).get_shape()[0] for k in ("latents", "labels")}
            covered = shard.metadata()["images"]
        expected = f"{images.start},{images.stop}"
        problem = None
        if covered != expected:
            problem = f"it holds images [{covered}), not [{expected})"
        elif len(sizes) != 1:
            problem = "its latents and labels differ in number"
    except Exception as err:  # noqa: BLE001 - any failure means "re-encode it"
        problem = str(err)
    if problem:
        warnings.warn(f"re-encoding unreadable shard {path} ({problem})", stacklevel=3)
    return problem is None


def _moments(values: torch.Tensor) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of every value, in float64."""
    x = values.double()
    if not x.numel():
        return 0, 0.0, 0.0
    mean = x.mean()
    return x.numel(), mean.item(), (x - mean).square().sum().item()


def _merge(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Chan et al.'s pairwise update: the moments of two sets from theirs (exact, stable)."""
    n = a[0] + b[0]
    if not n:
        return a
    delta = b[1] - a[1]
    return n, a[1] + delta * b[0] / n, a[2] + b[2] + delta * delta * a[0] * b[0] / n


@torch.no_grad()
def _encode_shards(
    tokenizer: VQTokenizer,
    dataset: Dataset,
    config: CacheConfig,
    shards: list[int],
    accelerator: Accelerator | None,
) -> None:
    """Encode and write ``shards`` into ``config.dir`` (see the module docstring for what each
    holds). Images are decoded once by ``config.num_workers`` loader workers; an unreadable one
    is left out and named in its shard. The tokenizer encodes in eval mode on
    ``accelerator.device`` (else its own device) under the accelerator's autocast (the quantizer
    searches in float32 whatever autocast says)."""
    device = accelerator.device if accelerator else next(tokenizer.parameters()).device
    autocast = accelerator.autocast if accelerator else contextlib.nullcontext
    root, dtype = Path(config.dir), DTYPES[config.dtype]
    chunks, owner = [], []  # image ranges of at most batch_size, none crossing a shard
    for k in shards:
        images = _images(k, config.shard_size, config.flips, len(dataset))
        for start in range(images.start, images.stop, config.batch_size):
            chunks.append(list(range(start, min(start + config.batch_size, images.stop))))
            owner.append(k)
    loader = DataLoader(
        ReadableItems(dataset),
        batch_sampler=chunks,
        collate_fn=collate_readable,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        # a private generator: processes encode different numbers of shards, and must not leave
        # with different global random states
        generator=torch.Generator(),
    )
    was_training = tokenizer.training
    tokenizer.to(device).eval()
    latents: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []  # of the shard being encoded
    unreadable: list[str] = []
    try:
        for i, batch in enumerate(loader):
            unreadable += batch["unreadable"]
            if len(batch["index"]):
                x = batch["pixel_values"].to(device, non_blocking=True)
                y = batch["label"].long()
                if config.flips:
                    x = torch.cat([x, x.flip(-1)])
                with autocast():
                    h = tokenizer.encode(x).latents
                # the quantizer gets float32 latents, so z_q holds its float32 codes exactly
                z = tokenizer.quantize(h.float()).z_q if config.quantized else h.float()
                if config.flips:  # image i, then its mirror image
                    z = torch.stack([z[: len(y)], z[len(y) :]], 1).flatten(0, 1)
                    y = y.repeat_interleave(2)
                latents.append(z.to(dtype).cpu())
                labels.append(y)
            k = owner[i]
            if i + 1 == len(chunks) or owner[i + 1] != k:  # the shard is done
                images = _images(k, config.shard_size, config.flips, len(dataset))
                write_shard(root, k, latents, labels, images, unreadable)
                latents, labels, unreadable = [], [], []
    finally:
        tokenizer.train(was_training)


def write_shard(
    root: Path,
    k: int,
    latents: list[torch.Tensor],
    labels: list[torch.Tensor],
    images: range,
    unreadable: list[str] = (),
) -> None:
    """Shard ``k`` of ``images`` (batches of latents and labels; none if every image was
    unreadable), with its image range, the names of its ``unreadable`` images and the moments
    of its latent values in its metadata, written atomically (a killed run never leaves a half
    shard under the real name)."""
    path = root / _shard_name(k)
    tmp = path.with_name(path.name + ".tmp")
    z = torch.cat(latents) if latents else torch.zeros(0)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    n, mean, m2 = _moments(z)
    metadata = {
        "count": str(n),
        "mean": repr(mean),
        "m2": repr(m2),
        "images": f"{images.start},{images.stop}",
        "unreadable": json.dumps(list(unreadable)),
    }
    save_file({"latents": z.contiguous(), "labels": y.long().contiguous()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _summary(root: Path, names: list[str]) -> dict[str, Any]:
    """Items per shard, shapes, label range, the latents' mean and std and the unreadable
    images, from the shards' headers and labels (one small read per shard)."""
    moments, lows, highs, counts, unreadable, shape = (0, 0.0, 0.0), [], [], [], [], None
    for name in names:
        with safe_open(str(root / name), framework="pt") as shard:
            meta = shard.metadata()
            labels = shard.get_tensor("labels")
            if len(labels):
                shape = list(shard.get_slice("latents").get_shape()[1:])
        moments = _merge(moments, (int(meta["count"]), float(meta["mean"]), float(meta["m2"])))
        counts.append(len(labels))
        unreadable += json.loads(meta["unreadable"])
        if len(labels):
            lows.append(int(labels.min()))
            highs.append(int(labels.max()))
    if shape is None:
        raise ValueError(f"no image of the data could be read: {unreadable[:5]} ...")
    low, high = min(lows), max(highs)
    has_labels = low >= 0
    return {
        "count": sum(counts),
        "shard_counts": counts,
        "unreadable": len(unreadable),
        "unreadable_examples": unreadable[:20],
        "latent_shape": shape,
        "latent_mean": moments[1],
        "latent_std": math.sqrt(moments[2] / max(moments[0] - 1, 1)),
        "label_min": low,
        "label_max": high,
        "has_labels": has_labels,
        "num_classes": high + 1 if has_labels else 0,
    }


def build_latent_cache(
    tokenizer: VQTokenizer,
    data_config: DataConfig | Mapping[str, Any],
    cache: CacheConfig | str | os.PathLike,
    *,
    part: str = "train",
    accelerator: Accelerator | None = None,
) -> LatentCache:
    """Encode ``part`` of the data into ``cache.dir`` (or reuse the complete cache there) and
    open it on every process.

    ``cache`` says how (:class:`CacheConfig`; a folder stands for the default settings in it).
    Random data augmentations (``flip``, random ``crop``) are replaced by fixed views. A cache of
    other settings, or of an older format, raises :class:`StaleCacheError`. With an
    ``accelerator`` of N processes, process r encodes the shards k with k % N == r, under the
    accelerator's autocast; a restarted build only encodes the missing shards. Every decision
    about the folder is taken by the main process and broadcast, so all processes enter the same
    collectives. Encoding runs in eval mode without gradients on ``accelerator.device`` (the
    tokenizer is moved there) or on the tokenizer's device."""
    if not isinstance(cache, CacheConfig):
        cache = CacheConfig(dir=os.fspath(cache))
    if part not in PARTS or cache.dir is None:
        raise ValueError(f"need part in {PARTS} and a cache.dir; got {part!r}, {cache.dir!r}")
    root, config = Path(cache.dir), _data_config(data_config, part)
    settings = {
        "format": FORMAT,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_config": _tokenizer_config(tokenizer),
        "data": dataclasses.asdict(config),
        "part": part,
        "quantized": cache.quantized,
        "flips": cache.flips,
        "dtype": cache.dtype,
        "precision": accelerator.mixed_precision if accelerator else "no",
    }
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    barrier = accelerator.wait_for_everyone if accelerator else lambda: None

    def check_folder() -> dict[str, Any] | None:
        previous = _read_settings(root)
        if previous is not None:
            diffs = _differences(previous, settings)
            if diffs:
                raise _stale(
                    root,
                    "a latent cache built with other settings (cache vs "
                    "requested: " + "; ".join(diffs) + ")",
                )
        return previous

    previous = main_process_decides(accelerator, check_folder)
    if previous is not None and previous.get("complete"):
        return _open(root, rank)
    with accelerator.local_main_process_first() if accelerator else contextlib.nullcontext():
        dataset = build_dataset(config, part)  # the local main process lists the data first
    images = len(dataset)
    if previous is not None:
        if previous["images"] != images:
            raise _stale(
                root,
                f"a partial cache of {previous['images']} images, not {images} (the data changed)",
            )
        if previous["shard_size"] != cache.shard_size:
            warnings.warn(
                f"resuming {root} with its shard_size {previous['shard_size']} (not "
                f"{cache.shard_size})",
                stacklevel=2,
            )
            cache = dataclasses.replace(cache, shard_size=previous["shard_size"])
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / PENDING, {**settings, "images": images, "shard_size": cache.shard_size})
    barrier()
    names = _shard_names(images, cache.shard_size, cache.flips)
    todo = [
        k
        for k in range(rank, len(names), world)
        if not _shard_ok(root / names[k], _images(k, cache.shard_size, cache.flips, images))
    ]
    if todo:
        _encode_shards(tokenizer, dataset, cache, todo, accelerator)
    barrier()
    if rank == 0:
        complete_cache(root, settings, images, cache.shard_size)
    barrier()
    return _open(root, rank)


def complete_cache(root: Path, settings: dict[str, Any], images: int, shard_size: int) -> None:
    """Write metadata.json for the finished shards of the ``images`` of the part in ``root``
    (which marks the cache complete)."""
    names = _shard_names(images, shard_size, settings["flips"])
    _write_json(
        root / METADATA,
        {
            **settings,
            "dataset_size": images,
            "shard_size": shard_size,
            "shards": names,
            **_summary(root, names),
            "complete": True,
        },
    )
    (root / PENDING).unlink(missing_ok=True)


def _open(root: Path, rank: int) -> LatentCache:
    try:
        return LatentCache(root)
    except FileNotFoundError as err:
        if rank == 0:
            raise
        raise FileNotFoundError(
            f"{err} (process {rank} cannot see the cache that process 0 "
            "sees: cache.dir must be on storage that every process "
            "shares)"
        ) from None


def _map_shard(path: Path) -> dict[str, torch.Tensor]:
    """Tensors over memory maps of a safetensors file (its header says where each one lies: 8
    bytes of header length, the JSON header, then the data). Copy-on-write: a process that
    writes into an item changes its own copy, never the file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {
        name: torch.from_numpy(
            np.memmap(
                path,
                dtype=_NUMPY[info["dtype"]],
                mode="c",
                offset=8 + length + info["data_offsets"][0],
                shape=tuple(info["shape"]),
            ).view(np.ndarray)
        ).view(_TORCH[info["dtype"]])
        for name, info in header.items()
        if name != "__metadata__"
    }


class LatentCache(Dataset):
    """A complete latent cache; items are ``{"latents": C×h×w float32, "label": int64 scalar}``.

    Opening one reads metadata.json (``metadata``); the shards are memory-mapped on first use in
    each process (and again in each loader worker), never loaded whole: an item is a view of the
    mapped file (float32 storage) until the loader's collate copies it into the batch."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.root = Path(cache_dir)
        path = self.root / METADATA
        metadata = json.loads(path.read_text()) if path.is_file() else {}
        if not metadata.get("complete"):
            raise FileNotFoundError(
                f"{self.root} is not a complete latent cache (no complete {METADATA}); build "
                f"one with diffusion.latent_cache.build_latent_cache(tokenizer, data_config, "
                f"{str(self.root)!r})"
            )
        if metadata.get("format") != FORMAT:
            raise StaleCacheError(
                f"{self.root} is a latent cache of format {metadata.get('format')} (this "
                f"version reads format {FORMAT}); rebuild it: rm -r {self.root}, then run "
                "scripts/train_diffusion.py again (it encodes the data into that folder)"
            )
        self.metadata: dict[str, Any] = metadata
        self.starts = np.cumsum([0, *metadata["shard_counts"]])  # each shard's first item
        self._maps: list[dict[str, torch.Tensor]] | None = None

    def __getstate__(self) -> dict[str, Any]:  # a loader worker maps the files itself
        return {**self.__dict__, "_maps": None}

    def _shards(self) -> list[dict[str, torch.Tensor]]:
        if self._maps is None:
            maps = [_map_shard(self.root / name) for name in self.metadata["shards"]]
            for name, m, n in zip(self.metadata["shards"], maps, self.metadata["shard_counts"]):
                shape = [n, *self.metadata["latent_shape"]]
                if len(m["labels"]) != n or (n and list(m["latents"].shape) != shape):
                    raise ValueError(
                        f"{self.root} is damaged: {name} holds latents of shape "
                        f"{list(m['latents'].shape)}, metadata says {shape}; delete it and "
                        "build it again"
                    )
            self._maps = maps
        return self._maps

    def __len__(self) -> int:
        return self.metadata["count"]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"latent cache index {i} out of range 0..{len(self) - 1}")
        i %= len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        shard, row = self._shards()[k], i - int(self.starts[k])
        return {"latents": shard["latents"][row].float(), "label": shard["labels"][row]}

    def load(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``start:stop`` as (latents float32, labels), in memory: for small caches and
        checks, not for training."""
        items = [self[i] for i in range(len(self))[start:stop]]
        return (
            torch.stack([item["latents"] for item in items]),
            torch.stack([item["label"] for item in items]),
        )


def measure_scaling_factor(cache: LatentCache) -> float:
    """1 / std of all latent values (LDM's rule; the unbiased std, measured in float64 while the
    cache was built and stored in its metadata)."""
    std = cache.metadata["latent_std"]
    if not std > 0:
        raise ValueError(f"the latents of {cache.root} have std {std}; no scaling factor")
    return 1.0 / std
