"""Generation FID (and KID, IS, precision/recall, per-class FID) of a pipeline against its data.

Samples stream from the pipeline into torch-fidelity's Inception v3 batch by batch (no image
files); the features are gathered once across processes, in image order, so the count is exact
and the score does not depend on the number of processes. The reference features are computed
once per (data, part, preprocessing, Inception weights) and cached as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from engine.config import check_types, require
from engine.data import DataConfig, ReadableItems, build_dataset, collate_readable
from engine.distributed import main_process_decides
from engine.fid import inception_features
from pipelines.sampling import (
    image_labels,
    is_conditional,
    sample_images,
)

CACHE_ENV = "NEVERCOLLAPSE_FID_CACHE"
NO_WEIGHTS = 3  # exit status when the Inception weights cannot be had (scripts/demo.sh uses it)


@dataclass
class EvalConfig:
    """``eval`` section of a diffusion config: the defaults of ``scripts/eval_fid.py`` (its
    options override them), i.e. the paper's protocol for that dataset.

    num_samples: generated images (50,000 in LDM, CVQ-VAE and LooC).
    steps: DDIM steps (null: ``train.sample_steps``).
    eta: DDIM η (0: deterministic DDIM).
    guidance_scale: classifier-free guidance of class-conditional models (null:
      ``train.sample_guidance``).
    reference_part: the part of the ``data`` section the samples are compared with ("train": the
      papers' choice for generation FID, or "validation").
    reference_images: at most this many reference images, a fixed random subset (null: all).
    """

    num_samples: int = 50000
    steps: int | None = None
    eta: float = 0.0
    guidance_scale: float | None = None
    reference_part: str = "train"
    reference_images: int | None = 50000

    def __post_init__(self):
        check_types(self, "eval")
        require(self.num_samples >= 2, "eval.num_samples", self.num_samples, "must be >= 2")
        require(
            self.steps is None or self.steps >= 1, "eval.steps", self.steps, "must be >= 1 or null"
        )
        require(0 <= self.eta <= 1, "eval.eta", self.eta, "must be in [0, 1]")
        require(
            self.guidance_scale is None or self.guidance_scale >= 0,
            "eval.guidance_scale",
            self.guidance_scale,
            "must be >= 0 or null",
        )
        require(
            self.reference_part in ("train", "validation"),
            "eval.reference_part",
            self.reference_part,
            'choose "train" or "validation"',
        )
        require(
            self.reference_images is None or self.reference_images >= 2,
            "eval.reference_images",
            self.reference_images,
            "must be >= 2 or null",
        )


def default_cache_dir() -> Path:
    """``$NEVERCOLLAPSE_FID_CACHE``, else ``$XDG_CACHE_HOME/nevercollapse/fid`` (~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nevercollapse" / "fid"


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def folder_digest(folder: str | os.PathLike, skip: tuple[str, ...] = ("README.md",)) -> str:
    """Hash of every file under ``folder`` (configs and weights; not the model card nor
    Python's byte-code caches)."""
    digest = hashlib.sha256()
    files = [
        p
        for p in Path(folder).rglob("*")
        if p.is_file() and p.name not in skip and "__pycache__" not in p.parts
    ]
    for path in sorted(files):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(file_digest(path, 64).encode())
    return digest.hexdigest()[:16]


def reference_spec(data: DataConfig, part: str, max_images: int | None, weights: str) -> dict:
    """Everything the reference features depend on: the images (source, split, part and the
    split's seed and size), their preprocessing (resolution, channels, centre crop, no flip) and
    the feature extractor's weights."""
    prefix = "lsun:" if data.source.startswith("lsun:") else ""
    path = data.source.removeprefix(prefix)  # a local path counts by where it is, not how named
    source = prefix + os.path.abspath(path) if os.path.exists(path) else data.source
    return {
        "source": source,
        "split": data.split,
        "part": part,
        "validation_size": data.validation_size,
        "seed": data.seed,
        "image_column": data.image_column,
        "label_column": data.label_column,
        "resolution": data.resolution,
        "channels": data.channels,
        "crop": "center",
        "flip": False,
        "max_images": max_images,
        "features": "inception-v3-compat/2048",
        "inception_weights": weights,
    }


def reference_key(spec: dict) -> str:
    """A readable, unique cache key: ``<source name>-<part>-<resolution>px-<hash of spec>``."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", Path(spec["source"]).name or spec["source"]).strip("-")
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{name[:40] or 'data'}-{spec['part']}-{spec['resolution']}px-{digest}"


def gather_in_order(
    accelerator: Accelerator, ids: list[int], values: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Concatenate every process's rows (row j of each tensor belongs to item ``ids[j]``) and
    sort them by item id, on the CPU. Uneven shares are padded for the collective and dropped."""
    index = torch.tensor(ids, dtype=torch.long)
    if accelerator.num_processes > 1:
        device = accelerator.device
        index = accelerator.gather(
            accelerator.pad_across_processes(index.to(device), pad_index=-1)
        ).cpu()
        values = {
            k: accelerator.gather(accelerator.pad_across_processes(v.to(device))).cpu()
            for k, v in values.items()
        }
    keep = index >= 0
    order = torch.argsort(index[keep])
    return {k: v[keep][order] for k, v in values.items()}


def _concat(parts: dict[str, list[torch.Tensor]], widths: dict[str, int]) -> dict:
    """Concatenate each list of batches; a process with no items (more processes than items)
    gets empty tensors of the right shape (``widths[name]`` columns; 0: a vector of labels)."""

    def empty(width):
        return torch.zeros(0, width) if width else torch.zeros(0, dtype=torch.long)

    return {k: torch.cat(v) if v else empty(widths[k]) for k, v in parts.items()}


@dataclass
class Reference:
    features: torch.Tensor  # N×2048 float32
    labels: torch.Tensor  # N int64 (-1: unlabelled)
    key: str
    spec: dict
    path: Path
    cached: bool  # read from the cache rather than computed


@torch.no_grad()
def reference_features(
    data: DataConfig,
    part: str,
    inception: torch.nn.Module,
    accelerator: Accelerator,
    *,
    weights: str,
    max_images: int | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
) -> Reference:
    """Inception features of the reference images, read as for training (same source, split,
    resolution and channels; centre crop, no flips), from the cache when it holds them (the main
    process decides and reads it; the others then get empty features)."""
    spec = reference_spec(data, part, max_images, weights)
    key = reference_key(spec)
    path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
    # one decision for all: a process that computes enters the gather below
    if main_process_decides(accelerator, lambda: path.is_file() and not refresh):
        if not accelerator.is_main_process:  # only the main process computes the metrics
            return Reference(
                torch.zeros(0, 2048), torch.zeros(0, dtype=torch.long), key, spec, path, cached=True
            )
        stored = load_file(path)
        return Reference(stored["features"], stored["labels"], key, spec, path, cached=True)

    with accelerator.local_main_process_first():  # it lists the data once for everyone
        dataset = build_dataset(replace(data, crop="center", flip=False), part)
    chosen = list(range(len(dataset)))
    if max_images is not None and len(dataset) > max_images:  # a fixed random subset
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        chosen = sorted(perm[:max_images].tolist())
    mine = chosen[accelerator.process_index :: accelerator.num_processes]
    parts, ids, unreadable = {"features": [], "labels": []}, [], []
    # an unreadable image is left out, never replaced by another one
    loader = DataLoader(
        Subset(ReadableItems(dataset), mine), batch_size=batch_size, collate_fn=collate_readable
    )
    for batch in tqdm(
        loader, desc=f"reference features ({part})", disable=not accelerator.is_local_main_process
    ):
        unreadable += batch["unreadable"]
        if not len(batch["index"]):
            continue
        parts["features"].append(inception_features(inception, batch["pixel_values"])["2048"])
        parts["labels"].append(torch.as_tensor(batch["label"]).long())
        ids += batch["index"].tolist()
    if unreadable:
        print(f"{len(unreadable)} unreadable reference image(s) left out, e.g. {unreadable[:3]}")
    found = gather_in_order(accelerator, ids, _concat(parts, {"features": 2048, "labels": 0}))
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial{os.getpid()}")
        save_file(
            {k: v.contiguous() for k, v in found.items()},
            str(partial),
            metadata={"spec": json.dumps(spec, sort_keys=True)},
        )
        os.replace(partial, path)  # atomic: a killed run leaves no half-written entry
    accelerator.wait_for_everyone()
    return Reference(found["features"], found["labels"], key, spec, path, cached=False)


@torch.no_grad()
def generated_features(
    pipe,
    inception: torch.nn.Module,
    accelerator: Accelerator,
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    steps: int,
    eta: float,
    guidance_scale: float,
    class_labels: list[int] | None = None,
    save_dir: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Features ("2048", and "logits_unbiased" if the Inception model computes them) and labels
    (-1 for unconditional pipelines) of ``num_samples`` images, image ``i`` drawn from seed
    ``seed + i`` exactly as ``scripts/sample.py`` draws it; optionally saved as PNGs too."""
    conditional = is_conditional(pipe)
    mine = list(range(num_samples))[accelerator.process_index :: accelerator.num_processes]
    names = inception.features_list
    parts = {name: [] for name in names} | {"labels": []}
    for start in tqdm(
        range(0, len(mine), batch_size),
        desc=f"sampling ({steps} steps)",
        disable=not accelerator.is_local_main_process,
    ):
        ids = mine[start : start + batch_size]
        labels = (
            image_labels(ids, seed, pipe.num_classes, class_labels)
            if conditional
            else [-1] * len(ids)
        )
        images = sample_images(
            pipe,
            ids,
            seed=seed,
            steps=steps,
            eta=eta,
            guidance_scale=guidance_scale,
            labels=labels,
            output_type="pt",
        ).float()
        for name, value in inception_features(inception, images * 2 - 1).items():
            parts[name].append(value)
        parts["labels"].append(torch.tensor(labels))
        if save_dir is not None:
            _save_pngs(images, ids, labels, Path(save_dir))
    widths = {name: 2048 if name == "2048" else 1008 for name in names} | {"labels": 0}
    return gather_in_order(accelerator, mine, _concat(parts, widths))


def _save_pngs(images: torch.Tensor, ids: list[int], labels: list[int], folder: Path) -> None:
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    for image, i, label in zip(images, ids, labels):
        save_image(image, folder / (f"{i:06d}" + (f"_class{label}" if label >= 0 else "") + ".png"))
