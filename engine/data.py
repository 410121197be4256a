"""Datasets shared by both training stages and FID: scikit-learn's 1,797 real 8×8 digits (the
embedded default), image folders, parquet / arrow / ``save_to_disk`` tables, Hugging Face hub
datasets and LSUN LMDB exports, all preprocessed the same way (see :class:`DataConfig`). Tables
and hub datasets can also be streamed (``streaming: true``, see :mod:`engine.streaming`)."""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from .config import ConfigError, check_types, from_mapping, require
from .manifest import Manifest, open_manifest

PARTS = ("train", "validation")
ACCEPTED = (
    "source accepts 'digits', a local image folder, a .parquet / .arrow file, a datasets "
    "save_to_disk directory, 'lsun:/path/to/lmdb' or a Hugging Face hub dataset name"
)


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


@dataclass
class DataConfig:
    """Where the images come from and how they are preprocessed (the ``data:`` config section).

    source: ``"digits"`` (scikit-learn's 1,797 8×8 digits, labels 0-9); a local image folder
        (recursive, split folders and class labels as ``datasets``' imagefolder reads them; listed
        once into a shared manifest, see :mod:`engine.manifest`); a ``.parquet`` / ``.arrow``
        file or ``save_to_disk`` directory; ``"lsun:PATH"``, an LSUN LMDB export (``pip install
        lmdb``); else a hub dataset name.
    split: split read from an image folder, a hub dataset or a saved ``DatasetDict``.
    resolution: images are resized (shorter side) and cropped to resolution × resolution.
    channels: 1 (grayscale) or 3 (RGB); transparency is composited on white.
    crop: ``"center"`` or ``"random"``; the random crop is used on the train part only.
    flip: random horizontal flips, train part only.
    image_column: column holding the images of table / hub sources.
    label_column: column holding integer labels of table / hub sources (None: labels are -1).
    validation_size: held-out "validation" part: a fraction in (0, 1) or a count >= 1. For a
        stream, a count: its first ``validation_size`` examples (see ``streaming``).
    seed: seed of the train / validation split (identical on every process and run).
    strict: raise at the first unreadable image instead of warning and skipping it.
    dataset_config_name: the configuration of a hub dataset (``datasets.load_dataset``'s
        ``name``, as in diffusers' training scripts); hub sources only.
    cache_dir: ``datasets``' cache folder (default ``$HF_DATASETS_CACHE``) for hub datasets and
        .parquet files (converted once to Arrow there unless streamed); not for other sources.
    streaming: read a hub dataset, .parquet / .arrow file or ``save_to_disk`` folder as a stream
        (``load_dataset(..., streaming=True)``): nothing is downloaded or converted before the
        first step. The train part is then an :class:`engine.streaming.ImageStream` (each process
        reads its own shards, in a seeded shuffle buffer reshuffled each epoch; resumed
        exactly); the validation part is its first ``validation_size`` examples (an integer),
        read once into memory and never trained on. Image folders, LMDBs and digits are already
        read lazily, image by image, and refuse it.
    shuffle_buffer_size: streams only: examples in the shuffle buffer (``IterableDataset.shuffle``'s
        ``buffer_size``), undecoded: about the file size of that many images in memory.
    """

    source: str = "digits"
    split: str = "train"
    resolution: int = 32
    channels: int = 3
    crop: str = "center"
    flip: bool = False
    image_column: str = "image"
    label_column: str | None = None
    validation_size: float = 0.05
    seed: int = 0
    strict: bool = False
    dataset_config_name: str | None = None
    cache_dir: str | None = None
    streaming: bool = False
    shuffle_buffer_size: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.source, os.PathLike):
            self.source = os.fspath(self.source)
        if isinstance(self.cache_dir, os.PathLike):
            self.cache_dir = os.fspath(self.cache_dir)
        check_types(self, "data")
        size = self.validation_size
        require(self.source != "", "data.source", self.source, "a non-empty string")
        require(self.resolution >= 1, "data.resolution", self.resolution, "an integer >= 1")
        require(self.channels in (1, 3), "data.channels", self.channels, "1 or 3")
        require(self.seed >= 0, "data.seed", self.seed, "an integer >= 0")
        require(self.crop in ("center", "random"), "data.crop", self.crop, "'center' or 'random'")
        require(
            (isinstance(size, int) and size >= 1) or (isinstance(size, float) and 0 < size < 1),
            "data.validation_size",
            size,
            "a fraction 0 < x < 1 or an integer count >= 1",
        )
        for key in ("dataset_config_name", "cache_dir"):
            value = getattr(self, key)
            require(value != "", f"data.{key}", value, "a non-empty string or null (the default)")
        require(
            self.shuffle_buffer_size >= 1,
            "data.shuffle_buffer_size",
            self.shuffle_buffer_size,
            "an integer >= 1",
        )
        require(
            isinstance(size, int) or not self.streaming,
            "data.validation_size",
            size,
            "a stream has no known length: with data.streaming: true give an integer count, "
            "the examples held out from the start of the stream (e.g. 1000)",
        )
        if self.source == "digits" or self.source.startswith("lsun:"):
            check_source_keys(self)  # the rest need the file system: check_source_exists


class UnreadableImageError(ValueError):
    """With ``strict: true``, the first image that cannot be read (its name is in the message)."""


def check_source_exists(config: DataConfig) -> None:
    """Raise a ConfigError, before anything is built, if ``data.source`` names a local path
    (absolute, ``./``, ``~``, ``lsun:PATH``, a .parquet / .arrow file) that does not exist, or
    if a key is set that the source has no use for (:func:`check_source_keys`)."""
    source = config.source
    path = os.path.expanduser(source[len("lsun:") :] if source.startswith("lsun:") else source)
    local = source.startswith(("lsun:", "/", ".", "~")) or path.endswith((".parquet", ".arrow"))
    require(
        not local or os.path.exists(path),
        "data.source",
        source,
        f"no such file or folder; {ACCEPTED}",
    )
    check_source_keys(config)


_KINDS = {  # what each kind of source is, as the refusals below say it
    "digits": "scikit-learn's digits, held in memory",
    "lsun": "an LSUN LMDB export, read image by image",
    "folder": "a local image folder, read image by image",
    "parquet": "a .parquet file",
    "arrow": "a .arrow file, memory-mapped where it is",
    "saved": "a save_to_disk folder, memory-mapped where it is",
    "hub": "a Hugging Face hub dataset",
}


def source_kind(source: str) -> str:
    """What ``source`` names: "digits", "lsun", "folder", "parquet", "arrow", "saved" (a
    ``save_to_disk`` directory), "hub" (anything else that is not a local path), "file" (a file
    of another type) or "missing" (a local path that does not exist)."""
    path = os.path.expanduser(source)
    if source == "digits":
        return "digits"
    if source.startswith("lsun:"):
        return "lsun"
    if os.path.isfile(path):
        return path.rsplit(".", 1)[-1] if path.endswith((".parquet", ".arrow")) else "file"
    if any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        return "saved"
    if os.path.isdir(path):
        return "folder"
    if source.startswith(("/", ".", "~")) or path.endswith((".parquet", ".arrow")):
        return "missing"
    return "hub"


def check_source_keys(config: DataConfig) -> None:
    """Refuse, with a ConfigError naming the key and the fix, ``dataset_config_name`` for a
    source that is not on the hub, ``cache_dir`` for one that ``datasets`` does not cache and
    ``streaming`` for one that is already read image by image."""
    kind = source_kind(config.source)
    if kind in ("file", "missing"):
        return  # reading the source says what is wrong with it
    what = f"{config.source!r} is {_KINDS[kind]}"
    require(
        config.dataset_config_name is None or kind == "hub",
        "data.dataset_config_name",
        config.dataset_config_name,
        f"it picks a configuration of a hub dataset (datasets' name) and {what}: remove it",
    )
    listed = (
        " (its listing goes to $NEVERCOLLAPSE_DATA_CACHE)" if kind in ("folder", "lsun") else ""
    )
    require(
        config.cache_dir is None or kind in ("hub", "parquet"),
        "data.cache_dir",
        config.cache_dir,
        f"it is datasets' cache folder, used by hub datasets and .parquet files, and {what}"
        f"{listed}: remove it",
    )
    require(
        not config.streaming or kind in ("hub", "parquet", "arrow", "saved"),
        "data.streaming",
        config.streaming,
        f"streams are for hub datasets and .parquet / .arrow / save_to_disk tables, and {what}, "
        "which needs no download or conversion up front: set data.streaming: false",
    )


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


def _transform(config: DataConfig, train: bool, tensors: bool) -> Callable:
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
    (:class:`engine.run.EpochBatches`) to do."""

    seeded_items = True

    def __init__(
        self, reader: _Reader, indices: np.ndarray, transform: Callable, channels: int, strict: bool
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
            name = self.reader.name(j)
            if self.strict:
                raise UnreadableImageError(
                    f"unreadable image {name} ({err}); remove the file or set strict: false to "
                    "skip unreadable images"
                ) from err
            warnings.warn(f"skipping unreadable image {name} ({err})", stacklevel=3)
            self._bad.add(j)
            self.skipped.append(name)
            return {"unreadable": name}
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


class _Reader:
    """Loads item ``i`` of a source as (image, label); ``names`` has one entry per item."""

    names: Any

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return str(self.names[i])


class _Digits(_Reader):
    def __init__(self, config: DataConfig) -> None:
        self.images, self.labels = digits(config.resolution)
        self.channels, self.names = config.channels, [f"digit {i}" for i in range(len(self.images))]

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].repeat(self.channels, 1, 1), int(self.labels[i])


class _Listed(_Reader):
    """A split of a source listed in a :class:`~engine.manifest.Manifest` (an image folder or
    an LSUN LMDB): names and labels stay in the memory-mapped manifest."""

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


class _Folder(_Listed):
    """An image folder, with ``datasets``' imagefolder splits and labels (see
    :mod:`engine.manifest`)."""

    def name(self, i: int) -> str:
        return os.path.join(self.root, self._row(i)[0])

    def load(self, i: int) -> tuple[Image.Image, int]:
        path, label = self._row(i)
        return Image.open(os.path.join(self.root, path)), label


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


class _Table(_Reader):
    """Rows of a ``datasets.Dataset``: images (PIL, ``{"bytes", "path"}`` dicts, bytes or paths)
    in ``image_column``, integer labels in ``label_column``, decoded by ``datasets`` and
    :class:`DecodeImages` through ``Dataset.with_transform`` (the crop / flip / scaling stays
    with :class:`ImageDataset`: it depends on the part, and an error there is no unreadable
    image)."""

    def __init__(self, table: Any, source: str, config: DataConfig) -> None:
        table = table_columns(table, source, config)
        self.table = table.with_transform(
            DecodeImages(config.image_column, config.label_column, config.channels)
        )
        self.source = source

    def __len__(self) -> int:
        return len(self.table)

    def name(self, i: int) -> str:
        return f"{self.source} row {i}"

    def load(self, i: int) -> tuple[Image.Image, int]:
        row = self.table[i]  # decoded here: an unreadable image raises, and ImageDataset names it
        return row["image"], row["label"]


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


class _Lmdb(_Listed):
    """An LSUN LMDB export (values are encoded images, keys arbitrary). The environment is opened
    lazily in each process, so that the reader works in DataLoader workers."""

    def load(self, i: int) -> tuple[Image.Image, int]:
        with _lmdb_env(self.root).begin() as txn:
            return Image.open(io.BytesIO(txn.get(self._row(i)[0]))), -1

    def name(self, i: int) -> str:
        return f"{self.root} key {self._row(i)[0]!r}"


def _lmdb_reader(path: str, config: DataConfig) -> _Lmdb:
    try:
        import lmdb  # noqa: F401
    except ImportError as err:
        raise ImportError("the lsun: source needs the lmdb package: pip install lmdb") from err
    if not os.path.exists(path):
        raise FileNotFoundError(f"LSUN LMDB {path} does not exist; {ACCEPTED}")
    path = os.path.realpath(path)
    return _Lmdb(open_manifest(path, "lmdb", lmdb_env=_lmdb_env(path)), config.split)


def open_table(config: DataConfig) -> Any:
    """The ``datasets`` table behind a .parquet / .arrow file, a ``save_to_disk`` folder or a hub
    dataset: a ``Dataset``, or with ``streaming`` an ``IterableDataset``."""
    source, path, stream = config.source, os.path.expanduser(config.source), config.streaming
    kind = source_kind(source)
    if kind == "file":
        raise ValueError(f"data source {source!r} is a file but not .parquet / .arrow; {ACCEPTED}")
    if kind == "missing":
        raise FileNotFoundError(f"data source {source!r} does not exist; {ACCEPTED}")
    check_source_keys(config)
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


def _reader(config: DataConfig) -> _Reader:
    """The reader behind ``config.source``."""
    source, kind = config.source, source_kind(config.source)
    if kind == "digits":
        return _Digits(config)
    if kind == "lsun":
        return _lmdb_reader(os.path.expanduser(source[len("lsun:") :]), config)
    if kind == "folder":
        check_source_keys(config)
        return _Folder(open_manifest(os.path.expanduser(source), "folder"), config.split)
    return _Table(open_table(config), source, config)


# a source's own held-out split, by datasets' and folders' usual names, in this order of choice
HELD_OUT_SPLITS = ("validation", "val", "valid", "test")


def held_out_split(config: DataConfig) -> str | None:
    """The source's own held-out split (a folder's ``validation/``, a hub dataset's or saved
    ``DatasetDict``'s "validation" / "val" / "valid" / "test") when ``split`` is another one:
    the validation part is then that split, whole. None for a source without one (and for
    streams, which hold their first ``validation_size`` examples out)."""
    kind = source_kind(config.source)
    if config.streaming or kind not in ("folder", "saved", "hub"):
        return None
    if kind == "folder":
        splits = open_manifest(os.path.expanduser(config.source), "folder").splits
    else:
        import datasets

        try:
            if kind == "saved":
                table = datasets.load_from_disk(os.path.expanduser(config.source))
                splits = list(table) if isinstance(table, datasets.DatasetDict) else []
            else:
                splits = datasets.get_dataset_split_names(config.source, config.dataset_config_name)
        except Exception:  # noqa: BLE001 - no split names to be had: a seeded slice, then
            return None
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
    :class:`engine.streaming.ImageStream`."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if isinstance(config, Mapping):
        config = from_mapping(DataConfig, dict(config), "data")
    elif not isinstance(config, DataConfig):
        raise TypeError(f"config must be a DataConfig or a dict, got {type(config).__name__}")
    if config.streaming:
        from .streaming import build_stream

        return build_stream(config, part)
    held = held_out_split(config)
    reader = _reader(
        dataclasses.replace(config, split=held) if held and part != "train" else config
    )
    if len(reader) == 0:
        raise ConfigError(f"data source {config.source!r} holds no images")
    indices = np.arange(len(reader)) if held else split_indices(len(reader), config, part)
    transform = _transform(config, part == "train", tensors=isinstance(reader, _Digits))
    return ImageDataset(reader, indices, transform, config.channels, config.strict)


def class_names(config: DataConfig) -> list[str] | None:
    """The names of the source's classes, label i being the i-th: an image folder's class
    folders (sorted, as its labels are numbered) or the ``names`` of a table's ``ClassLabel``
    ``label_column``; None if the source names no classes."""
    reader = _reader(config)
    if isinstance(reader, _Folder):
        return list(reader.manifest.meta["classes"]) or None
    if isinstance(reader, _Table) and config.label_column:
        return getattr(reader.table.features[config.label_column], "names", None)
    return None
