"""The datasets both training stages and FID read: a part ("train" or "validation") of a source,
preprocessed the same way whatever the source (see :class:`~engine.data.config.DataConfig`):
:func:`build_dataset` splits the source's items, chooses the part's transform and wraps its
reader (:mod:`engine.data.readers`) in an :class:`ImageDataset`, or for the train part of a
stream returns an :class:`~engine.data.streaming.ImageStream`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from ..config import ConfigError, from_mapping
from .config import DataConfig
from .readers import Reader, open_reader, skip_unreadable, source_splits, to_mode
from .streaming import build_stream, held_out_reader

PARTS = ("train", "validation")


def build_transform(config: DataConfig, train: bool, tensors: bool) -> Callable:
    """Resize the shorter side, crop, flip (train only), scale to [-1, 1]; ``tensors`` (digits,
    already R×R in [-1, 1]) are only flipped."""
    size, flip = config.resolution, [T.RandomHorizontalFlip()] if config.flip and train else []
    if tensors:
        return T.Compose(flip)
    crop = T.RandomCrop(size) if config.crop == "random" and train else T.CenterCrop(size)
    half = [0.5] * config.channels
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            crop,
            *flip,
            T.ToTensor(),
            T.Normalize(half, half),
        ]
    )


class ImageDataset(Dataset):
    """One part of a source; items are ``{"pixel_values": C×R×R float32 in [-1, 1], "label":
    int64 scalar}``. ``indices`` (a sorted int64 array) are the part's items in the source;
    ``skipped`` names the unreadable images found while decoding (in this process). An item is
    asked for by index (augmented from the global RNG) or as an (index, seed) pair (augmented
    from ``seed``, the global RNG untouched), which ``seeded_items`` tells the training loader
    (:class:`engine.loader.EpochBatches`) to do."""

    seeded_items = True

    def __init__(
        self, reader: Reader, indices: np.ndarray, transform: Callable, channels: int, strict: bool
    ) -> None:
        self.reader, self.indices, self.transform = reader, indices, transform
        self.channels, self.strict = channels, strict
        self.skipped: list[str] = []
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        for k in range(len(self.indices)):  # an undecodable image is replaced by the next one
            out = self._load(int(self.indices[(i + k) % len(self.indices)]), seed)
            if "unreadable" not in out:
                return out
        raise RuntimeError("no readable image left in this dataset")

    def readable(self, i: int) -> dict[str, Any]:
        """Item ``i`` as it is, never replaced: its tensors and ``index`` i, or ``{"unreadable":
        its name}``. For what must count images exactly (the latent cache, FID's reference),
        through :class:`ReadableItems` and :func:`collate_readable`."""
        out = self._load(int(self.indices[i]), None)
        return out if "unreadable" in out else {**out, "index": torch.tensor(i)}

    def _load(self, j: int, seed: int | None) -> dict[str, Any]:
        """Source item ``j`` decoded and transformed, or ``{"unreadable": its name}`` (named in
        ``skipped``, with a warning; with ``strict``, raised)."""
        if j in self._bad:
            return {"unreadable": self.reader.name(j)}
        try:
            image, label = self.reader.load(j)
            if isinstance(image, Image.Image):
                image = to_mode(image, self.channels)
        except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"
            skip_unreadable(self.reader.name(j), err, self.strict, self.skipped)
            self._bad.add(j)
            return {"unreadable": self.skipped[-1]}
        return {
            "pixel_values": self._augment(image, seed),
            "label": torch.tensor(label, dtype=torch.long),
        }

    def _augment(self, image: Any, seed: int | None) -> torch.Tensor:
        if seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)


class ReadableItems(Dataset):
    """The items of an :class:`ImageDataset` as :meth:`ImageDataset.readable` gives them (an
    unreadable image stays a gap, never the next image), to load with
    :func:`collate_readable`."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset.readable(i)


def collate_readable(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of the readable items (``pixel_values``, ``label``, ``index``: which items they
    are) and the names of the ``unreadable`` ones."""
    good = [item for item in items if "unreadable" not in item]
    batch = default_collate(good) if good else {"index": torch.zeros(0, dtype=torch.long)}
    return {**batch, "unreadable": [item["unreadable"] for item in items if "unreadable" in item]}


# a source's own held-out split, by datasets' and folders' usual names, in this order of choice
HELD_OUT_SPLITS = ("validation", "val", "valid", "test")


def held_out_split(config: DataConfig) -> str | None:
    """The source's own held-out split (a folder's ``validation/``, a hub dataset's or saved
    ``DatasetDict``'s "validation" / "val" / "valid" / "test") when ``split`` is another one:
    the validation part is then that split, whole. None for a source without one (and for
    streams, which hold their first ``validation_size`` examples out)."""
    splits = source_splits(config)
    return next((s for s in HELD_OUT_SPLITS if s in splits and s != config.split), None)


# the keys that decide which images a run reads and which it holds out: what stage one records
# in the tokenizer it exports (its config's ``training_data``), and stage two reads by default
IMAGE_CHOICE = (
    "source",
    "split",
    "dataset_config_name",
    "image_column",
    "label_column",
    "validation_size",
    "seed",
)


def image_choice(config: DataConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in IMAGE_CHOICE}


def describe_parts(config: DataConfig, train: int, validation: int) -> str:
    """What the two parts are, for the log: the split of each and its images."""
    held = held_out_split(config)
    if held:
        return (
            f"data: {config.source}: split {config.split!r} for training ({train:,} images), "
            f"split {held!r} held out for validation ({validation:,} images)"
        )
    return (
        f"data: {config.source}: split {config.split!r}, {train:,} images for training and "
        f"{validation:,} held out for validation (data.validation_size="
        f"{config.validation_size!r}, seed {config.seed}: the source has no validation split)"
    )


def split_indices(count: int, config: DataConfig, part: str) -> np.ndarray:
    """The sorted item indices of ``part``: of a permutation seeded by ``seed``, the last
    ``validation_size`` items (a count, or a rounded fraction, at least 1) are "validation"."""
    size = config.validation_size
    held = size if isinstance(size, int) else max(1, round(size * count))
    if held >= count:
        raise ConfigError(
            f"data.validation_size = {size!r} leaves no training images: the source lists "
            f"{count} images; use a smaller fraction or count"
        )
    order = np.random.RandomState(config.seed).permutation(count)  # frozen stream
    return np.sort(order[: count - held] if part == "train" else order[count - held :])


def build_dataset(config: DataConfig | Mapping[str, Any], part: str = "train") -> Any:
    """The ``part`` ("train" or "validation") of the dataset described by ``config``: an
    :class:`ImageDataset`, except the train part of a stream (``streaming: true``), an
    :class:`engine.data.streaming.ImageStream`."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if isinstance(config, Mapping):
        config = from_mapping(DataConfig, dict(config), "data")
    elif not isinstance(config, DataConfig):
        raise TypeError(f"config must be a DataConfig or a dict, got {type(config).__name__}")
    train = part == "train"
    if config.streaming and train:
        return build_stream(config, build_transform(config, train=True, tensors=False))
    if config.streaming:
        reader = held_out_reader(config)
        transform = build_transform(config, train=False, tensors=False)
        return ImageDataset(
            reader, np.arange(len(reader)), transform, config.channels, config.strict
        )
    held = held_out_split(config)
    reader = open_reader(dataclasses.replace(config, split=held) if held and not train else config)
    if len(reader) == 0:
        raise ConfigError(f"data source {config.source!r} holds no images")
    indices = np.arange(len(reader)) if held else split_indices(len(reader), config, part)
    transform = build_transform(config, train, tensors=reader.tensors)
    return ImageDataset(reader, indices, transform, config.channels, config.strict)
