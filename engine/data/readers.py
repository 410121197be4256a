"""The readers of the sources a :class:`~engine.data.config.DataConfig` names, and the decoding
they share. A reader loads item ``i`` of a source as (image, label) and names it; the dataset
(:mod:`engine.data.dataset`) crops, flips and scales what it loads. A new kind of source is a
reader here, opened by :func:`open_reader`, with its kind in :mod:`engine.data.config`.

- :class:`DigitsReader`: scikit-learn's 1,797 real 8×8 digits (the embedded default);
- :class:`FolderReader`: an image folder, listed once into a manifest (:mod:`engine.data.manifest`);
- :class:`LmdbReader`: an LSUN LMDB export, listed the same way;
- :class:`TableReader`: a parquet / arrow / ``save_to_disk`` table or a Hugging Face hub dataset
  (:func:`open_table`, which also opens them as streams, see :mod:`engine.data.streaming`).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import ConfigError, require
from .config import ACCEPTED, DataConfig, source_kind
from .manifest import Manifest, open_manifest


class UnreadableImageError(ValueError):
    """With ``strict: true``, the first image that cannot be read (its name is in the message)."""


def skip_unreadable(name: str, err: Exception, strict: bool, skipped: list[str]) -> None:
    """An image that does not decode: with ``strict``, an :class:`UnreadableImageError` naming
    it; else a warning, and ``name`` recorded in ``skipped``."""
    if strict:
        raise UnreadableImageError(
            f"unreadable image {name} ({err}); remove it from the data or set strict: false to "
            "skip unreadable images"
        ) from err
    warnings.warn(f"skipping unreadable image {name} ({err})", stacklevel=3)
    skipped.append(name)


def digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as N×1×R×R floats in [-1, 1] (bilinear up-sampling) and labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (
        F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False
        ).clamp(0, 1)
        * 2
        - 1
    )
    return images, torch.tensor(digits.target, dtype=torch.long)


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Decode ``image`` into 8-bit "L" (channels 1) or "RGB" (3): 16/32-bit integer images are
    rescaled (0..65535 → 0..255, "I" only when above 255), transparency is put on white."""
    image.load()  # decodes a lazily opened file: a broken one fails here
    if image.mode == ("L" if channels == 1 else "RGB"):
        return image
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def open_image(value: Any) -> Image.Image:
    """An image of a table row, decoded: a PIL image, ``datasets``' ``{"bytes", "path"}`` dict
    (decoded by ``datasets.Image``: local or remote paths, EXIF rotation), bytes or a path."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, str)):
        value = (
            {"bytes": value, "path": None}
            if isinstance(value, bytes)
            else {"bytes": None, "path": value}
        )
    if not isinstance(value, dict):
        raise TypeError(f"not an image: {type(value).__name__}")
    import datasets

    return datasets.Image().decode_example(value)


class DecodeImages:
    """The ``Dataset.with_transform`` function of table and hub sources (also what decodes a
    stream's examples): the images of ``image_column`` (see :func:`open_image`) in mode "L" or
    "RGB" as "image", the integers of ``label_column`` (-1 without one) as "label"."""

    def __init__(self, image_column: str, label_column: str | None, channels: int) -> None:
        self.image_column, self.label_column, self.channels = image_column, label_column, channels

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = [to_mode(open_image(v), self.channels) for v in batch[self.image_column]]
        labels = batch[self.label_column] if self.label_column else [-1] * len(images)
        return {"image": images, "label": [int(label) for label in labels]}


def image_name(source: str, value: Any, fallback: str) -> str:
    """How an unreadable image of a table / stream is named: its path when it has one."""
    path = (
        value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    )
    return f"{source} image {path}" if path else fallback


class Reader:
    """Loads item ``i`` of a source as (image, label); ``names`` has one entry per item. An
    image is a PIL image (decoded into the config's mode by the dataset) or a C×R×R tensor in
    [-1, 1] (``tensors``: only flipped)."""

    names: Any
    tensors = False

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return str(self.names[i])

    def load(self, i: int) -> tuple[Image.Image | torch.Tensor, int]:
        raise NotImplementedError

    def class_names(self) -> list[str] | None:
        """The names of the source's classes, label i being the i-th; None if it names none."""
        return None


class DigitsReader(Reader):
    """scikit-learn's digits, held in memory as tensors at the config's resolution."""

    tensors = True

    def __init__(self, config: DataConfig) -> None:
        self.images, self.labels = digits(config.resolution)
        self.channels, self.names = config.channels, [f"digit {i}" for i in range(len(self.images))]

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].repeat(self.channels, 1, 1), int(self.labels[i])


class _Listed(Reader):
    """A split of a source listed in a :class:`~engine.data.manifest.Manifest` (an image folder
    or an LSUN LMDB): names and labels stay in the memory-mapped manifest."""

    def __init__(self, manifest: Manifest, split: str) -> None:
        rows = manifest.rows(split)
        self.manifest, self.start, self.count = (
            manifest,
            manifest.meta["splits"][split][0],
            len(rows),
        )
        self.root = manifest.meta["source"]

    def __len__(self) -> int:
        return self.count

    def _row(self, i: int) -> tuple[Any, int]:
        table = self.manifest.table
        return table.column("name")[self.start + i].as_py(), table.column("label")[
            self.start + i
        ].as_py()


class FolderReader(_Listed):
    """An image folder, with ``datasets``' imagefolder splits and labels (see
    :mod:`engine.data.manifest`); its classes are its class folders, sorted."""

    def name(self, i: int) -> str:
        return os.path.join(self.root, self._row(i)[0])

    def load(self, i: int) -> tuple[Image.Image, int]:
        path, label = self._row(i)
        return Image.open(os.path.join(self.root, path)), label

    def class_names(self) -> list[str] | None:
        return list(self.manifest.meta["classes"]) or None


def table_columns(table: Any, source: str, config: DataConfig) -> Any:
    """``table`` (a ``datasets.Dataset`` or ``IterableDataset``) reduced to ``image_column`` and
    ``label_column``, after checking that they exist and that the labels are integers (a stream
    of unknown features is taken as it is)."""
    if table.features is None:
        return table
    for key, column in (
        ("image_column", config.image_column),
        ("label_column", config.label_column),
    ):
        if column is not None and column not in table.column_names:
            raise ConfigError(
                f"data config {key}={column!r} is not a column of {source}; "
                f"its columns are {table.column_names}"
            )
    feature = table.features.get(config.label_column)  # None when there are no labels
    if not str(getattr(feature, "dtype", "int")).startswith(("int", "uint")):
        raise ConfigError(
            f"data config label_column={config.label_column!r} must hold integer "
            f"labels, not {feature}"
        )
    return table.select_columns([c for c in (config.image_column, config.label_column) if c])


class TableReader(Reader):
    """Rows of a ``datasets.Dataset``: images (PIL, ``{"bytes", "path"}`` dicts, bytes or paths)
    in ``image_column``, integer labels in ``label_column``, decoded by ``datasets`` and
    :class:`DecodeImages` through ``Dataset.with_transform`` (the crop / flip / scaling stays
    with the dataset: it depends on the part, and an error there is no unreadable image). Its
    classes are the ``names`` of a ``ClassLabel`` ``label_column``."""

    def __init__(self, table: Any, source: str, config: DataConfig) -> None:
        table = table_columns(table, source, config)
        self.table = table.with_transform(
            DecodeImages(config.image_column, config.label_column, config.channels)
        )
        self.source, self.label_column = source, config.label_column

    def __len__(self) -> int:
        return len(self.table)

    def name(self, i: int) -> str:
        return f"{self.source} row {i}"

    def load(self, i: int) -> tuple[Image.Image, int]:
        row = self.table[i]  # decoded here: an unreadable image raises, and the dataset names it
        return row["image"], row["label"]

    def class_names(self) -> list[str] | None:
        if not self.label_column:
            return None
        return getattr(self.table.features[self.label_column], "names", None)


_LMDB_ENVS: dict[str, tuple[int, Any]] = {}  # path → (pid, environment): one per process


def _lmdb_env(path: str) -> Any:
    """This process's read-only environment of the LMDB at ``path`` (LMDB allows one per process;
    one inherited through fork is unusable, so it is closed and reopened)."""
    pid, env = _LMDB_ENVS.get(path, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()
        import lmdb

        env = lmdb.open(
            path,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            subdir=os.path.isdir(path),
        )
        _LMDB_ENVS[path] = (os.getpid(), env)
    return env


class LmdbReader(_Listed):
    """An LSUN LMDB export (values are encoded images, keys arbitrary). The environment is opened
    lazily in each process, so that the reader works in DataLoader workers."""

    def load(self, i: int) -> tuple[Image.Image, int]:
        with _lmdb_env(self.root).begin() as txn:
            return Image.open(io.BytesIO(txn.get(self._row(i)[0]))), -1

    def name(self, i: int) -> str:
        return f"{self.root} key {self._row(i)[0]!r}"


def _lmdb_reader(path: str, config: DataConfig) -> LmdbReader:
    try:
        import lmdb  # noqa: F401
    except ImportError as err:
        raise ImportError("the lsun: source needs the lmdb package: pip install lmdb") from err
    if not os.path.exists(path):
        raise FileNotFoundError(f"LSUN LMDB {path} does not exist; {ACCEPTED}")
    path = os.path.realpath(path)
    return LmdbReader(open_manifest(path, "lmdb", lmdb_env=_lmdb_env(path)), config.split)


def open_table(config: DataConfig) -> Any:
    """The ``datasets`` table behind a .parquet / .arrow file, a ``save_to_disk`` folder or a hub
    dataset: a ``Dataset``, or with ``streaming`` an ``IterableDataset``."""
    source, path, stream = config.source, os.path.expanduser(config.source), config.streaming
    kind = source_kind(source)
    if kind == "file":
        raise ValueError(f"data source {source!r} is a file but not .parquet / .arrow; {ACCEPTED}")
    if kind == "missing":
        raise FileNotFoundError(f"data source {source!r} does not exist; {ACCEPTED}")
    cache_dir = os.path.expanduser(config.cache_dir) if config.cache_dir else None
    import datasets

    if kind in ("parquet", "arrow"):
        require(
            config.split == "train",
            "data.split",
            config.split,
            f"{source} is one table: its only split is 'train'",
        )
        if stream:  # the packaged builder a hub parquet dataset goes through as well
            return datasets.load_dataset(
                kind, data_files=path, split="train", cache_dir=cache_dir, streaming=True
            )
        if kind == "arrow":
            return datasets.Dataset.from_file(path)
        return datasets.Dataset.from_parquet(path, cache_dir=cache_dir)
    if kind == "saved":
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            if config.split not in table:
                raise ConfigError(
                    f"data config split={config.split!r} is not in {source}; "
                    f"its splits are {list(table)}"
                )
            table = table[config.split]
        # one shard per Arrow file, as the files of a parquet dataset
        return (
            table.to_iterable_dataset(num_shards=max(1, len(table.cache_files)))
            if stream
            else table
        )
    try:
        return datasets.load_dataset(
            source,
            name=config.dataset_config_name,
            split=config.split,
            cache_dir=cache_dir,
            streaming=stream,
        )
    except Exception as err:  # noqa: BLE001 - offline, unknown name, missing split, ...
        raise ConfigError(
            f"the dataset {source!r} (split {config.split!r}) is no local path and "
            f"could not be loaded from the Hugging Face hub ({err}); without network "
            f"access set source to a local path: {ACCEPTED}"
        ) from err


def open_reader(config: DataConfig) -> Reader:
    """The reader of split ``config.split`` of ``config.source``."""
    source, kind = config.source, source_kind(config.source)
    if kind == "digits":
        return DigitsReader(config)
    if kind == "lsun":
        return _lmdb_reader(os.path.expanduser(source[len("lsun:") :]), config)
    if kind == "folder":
        return FolderReader(open_manifest(os.path.expanduser(source), "folder"), config.split)
    return TableReader(open_table(config), source, config)


def source_splits(config: DataConfig) -> list[str]:
    """The names of the splits of ``config.source``: a folder's split folders, a saved
    ``DatasetDict``'s or a hub dataset's splits; none for other sources, for streams (which hold
    their first ``validation_size`` examples out) and when a hub dataset's cannot be had."""
    kind = source_kind(config.source)
    if config.streaming or kind not in ("folder", "saved", "hub"):
        return []
    if kind == "folder":
        return open_manifest(os.path.expanduser(config.source), "folder").splits
    import datasets

    try:
        if kind == "saved":
            table = datasets.load_from_disk(os.path.expanduser(config.source))
            return list(table) if isinstance(table, datasets.DatasetDict) else []
        return datasets.get_dataset_split_names(config.source, config.dataset_config_name)
    except Exception:  # noqa: BLE001 - no split names to be had: a seeded slice, then
        return []


def class_names(config: DataConfig) -> list[str] | None:
    """The names of the source's classes, label i being the i-th: an image folder's class
    folders (sorted, as its labels are numbered) or the ``names`` of a table's ``ClassLabel``
    ``label_column``; None if the source names no classes."""
    return open_reader(config).class_names()
