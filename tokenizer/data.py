"""Datasets shared by both training stages and FID: scikit-learn's 1,797 real 8×8 digits (the
embedded default), image folders, parquet / arrow / ``save_to_disk`` tables, Hugging Face hub
datasets and LSUN LMDB exports, all preprocessed the same way (see :class:`DataConfig`)."""

from __future__ import annotations

import gzip
import io
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from .manifest import Manifest, open_manifest

PARTS = ("train", "validation")
ACCEPTED = ("source accepts 'digits', a local image folder, a .parquet / .arrow file, a datasets "
            "save_to_disk directory, 'lsun:/path/to/lmdb' or a Hugging Face hub dataset name")


def _digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as N×1×R×R floats in [-1, 1] (bilinear up-sampling) and labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear",
                           align_corners=False).clamp(0, 1) * 2 - 1
    return images, torch.tensor(digits.target, dtype=torch.long)


def load_digits(resolution: int = 16, validation: int = 297) -> dict[str, torch.Tensor]:
    """scikit-learn's digits, bilinearly up-sampled to ``resolution``, scaled to [-1, 1], as
    N×1×R×R float tensors with labels. The last ``validation`` images form the fixed validation
    split. Returns ``{"train", "train_labels", "val", "val_labels"}``."""
    images, labels = _digits(resolution)
    if not 0 < validation < len(images):
        raise ValueError(f"validation must be between 1 and {len(images) - 1}, got {validation}")
    cut = len(images) - validation
    return {"train": images[:cut], "train_labels": labels[:cut],
            "val": images[cut:], "val_labels": labels[cut:]}



def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An MNIST-style IDX file (optionally gzipped): big-endian magic (0, 0, type, ndim), the
    dimensions as big-endian uint32, then the data. Only unsigned-byte data (type 0x08)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (MNIST format)")
    ndim = raw[3]
    shape = tuple(np.frombuffer(raw, ">u4", count=ndim, offset=4).tolist())
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist_idx(images: str | os.PathLike, labels: str | os.PathLike,
                   validation: int = 1000) -> dict[str, torch.Tensor]:
    """MNIST IDX files as N×1×28×28 floats in [-1, 1] with labels; the last ``validation``
    images form the fixed validation split (no shuffling). Returns
    ``{"train", "train_labels", "val", "val_labels"}`` like :func:`load_digits`."""
    for path in (images, labels):
        if not Path(path).is_file():
            raise FileNotFoundError(f"MNIST file {str(path)!r} not found: put the IDX files "
                                    "(e.g. t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) "
                                    "there or point to their directory")
    x = torch.from_numpy(read_idx(images).copy()).float().unsqueeze(1) / 127.5 - 1
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} {len(y)} labels")
    if not 0 < validation < len(x):
        raise ValueError(f"validation must be between 1 and {len(x) - 1}, got {validation}")
    cut = len(x) - validation
    return {"train": x[:cut], "train_labels": y[:cut], "val": x[cut:], "val_labels": y[cut:]}


@dataclass
class DataConfig:
    """Where the images come from and how they are preprocessed (the ``data:`` config section).

    source: ``"digits"`` (scikit-learn's 1,797 8×8 digits, labels 0-9); a local image folder
        (recursive, split folders and class labels as ``datasets``' imagefolder reads them; listed
        once into a shared manifest, see :mod:`tokenizer.manifest`); a ``.parquet`` / ``.arrow``
        file or ``save_to_disk`` directory; ``"lsun:PATH"``, an LSUN LMDB export (``pip install
        lmdb``); else a hub dataset name.
    split: split read from an image folder, a hub dataset or a saved ``DatasetDict``.
    resolution: images are resized (shorter side) and cropped to resolution × resolution.
    channels: 1 (grayscale) or 3 (RGB); transparency is composited on white.
    crop: ``"center"`` or ``"random"``; the random crop is used on the train part only.
    flip: random horizontal flips, train part only.
    image_column: column holding the images of table / hub sources.
    label_column: column holding integer labels of table / hub sources (None: labels are -1).
    validation_size: held-out "validation" part: a fraction in (0, 1) or a count >= 1.
    seed: seed of the train / validation split (identical on every process and run).
    strict: raise at the first unreadable image instead of warning and skipping it.
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

    def __post_init__(self) -> None:
        if isinstance(self.source, os.PathLike):
            self.source = os.fspath(self.source)
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        string, size = lambda v: isinstance(v, str), self.validation_size  # noqa: E731
        checks = {
            "source": (string(self.source) and self.source != "", "a non-empty string"),
            "split": (string(self.split), "a string"),
            "resolution": (integer(self.resolution) and self.resolution >= 1, "an integer >= 1"),
            "channels": (integer(self.channels) and self.channels in (1, 3), "1 or 3"),
            "crop": (self.crop in ("center", "random"), "'center' or 'random'"),
            "flip": (isinstance(self.flip, bool), "true or false"),
            "image_column": (string(self.image_column), "a string"),
            "label_column": (self.label_column is None or string(self.label_column),
                             "a string or null"),
            "validation_size": ((integer(size) and size >= 1) or
                                (type(size) is float and 0 < size < 1),
                                "a fraction 0 < x < 1 or an integer count >= 1"),
            "seed": (integer(self.seed), "an integer"),
            "strict": (isinstance(self.strict, bool), "true or false"),
        }
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"data config {key}={getattr(self, key)!r} is invalid: "
                                 f"expected {allowed}")


class UnreadableImageError(ValueError):
    """With ``strict: true``, the first image that cannot be read (its name is in the message)."""


def check_source_exists(config: DataConfig) -> None:
    """Raise a ConfigError, before anything is built, if ``data.source`` names a local path
    (absolute, ``./``, ``~``, ``lsun:PATH``, a .parquet / .arrow file) that does not exist."""
    from .config import require

    source = config.source
    path = os.path.expanduser(source[len("lsun:"):] if source.startswith("lsun:") else source)
    local = source.startswith(("lsun:", "/", ".", "~")) or path.endswith((".parquet", ".arrow"))
    require(not local or os.path.exists(path), "data.source", source,
            f"no such file or folder; {ACCEPTED}")


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Decode ``image`` into 8-bit "L" (channels 1) or "RGB" (3): 16/32-bit integer images are
    rescaled (0..65535 → 0..255, "I" only when above 255), transparency is put on white."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def _transform(config: DataConfig, train: bool, tensors: bool) -> Callable:
    """Resize the shorter side, crop, flip (train only), scale to [-1, 1]; ``tensors`` (digits,
    already R×R in [-1, 1]) are only flipped."""
    size, flip = config.resolution, [T.RandomHorizontalFlip()] if config.flip and train else []
    if tensors:
        return T.Compose(flip)
    crop = T.RandomCrop(size) if config.crop == "random" and train else T.CenterCrop(size)
    half = [0.5] * config.channels
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      crop, *flip, T.ToTensor(), T.Normalize(half, half)])


class ImageDataset(Dataset):
    """One part of a source; items are ``{"pixel_values": C×R×R float32 in [-1, 1], "label":
    int64 scalar}``. ``indices`` (a sorted int64 array) are the part's items in the source;
    ``skipped`` names the unreadable images found while decoding (in this process)."""

    def __init__(self, reader: _Reader, indices: np.ndarray, transform: Callable, channels: int,
                 strict: bool) -> None:
        self.reader, self.indices, self.transform = reader, indices, transform
        self.channels, self.strict = channels, strict
        self.skipped: list[str] = []
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        for k in range(len(self.indices)):  # an undecodable image is replaced by the next one
            j = int(self.indices[(i + k) % len(self.indices)])
            if j in self._bad:
                continue
            try:
                image, label = self.reader.load(j)
                if isinstance(image, Image.Image):
                    image = to_mode(image, self.channels)
            except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"
                name = self.reader.name(j)
                if self.strict:
                    raise UnreadableImageError(f"unreadable image {name} ({err}); remove the "
                                               "file or set strict: false to skip unreadable "
                                               "images") from err
                warnings.warn(f"skipping unreadable image {name} ({err})", stacklevel=2)
                self._bad.add(j)
                self.skipped.append(name)
                continue
            return {"pixel_values": self.transform(image),
                    "label": torch.tensor(label, dtype=torch.long)}
        raise RuntimeError("no readable image left in this dataset")


class _Reader:
    """Loads item ``i`` of a source as (image, label); ``names`` has one entry per item."""

    names: Any

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return str(self.names[i])


class _Digits(_Reader):
    def __init__(self, config: DataConfig) -> None:
        self.images, self.labels = _digits(config.resolution)
        self.channels, self.names = config.channels, [f"digit {i}" for i in range(len(self.images))]

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].repeat(self.channels, 1, 1), int(self.labels[i])


class _Listed(_Reader):
    """A split of a source listed in a :class:`~tokenizer.manifest.Manifest` (an image folder or
    an LSUN LMDB): names and labels stay in the memory-mapped manifest."""

    def __init__(self, manifest: Manifest, split: str) -> None:
        rows = manifest.rows(split)
        self.manifest, self.start, self.count = manifest, manifest.meta["splits"][split][0], \
            len(rows)
        self.root = manifest.meta["source"]

    def __len__(self) -> int:
        return self.count

    def _row(self, i: int) -> tuple[Any, int]:
        table = self.manifest.table
        return table.column("name")[self.start + i].as_py(), \
            table.column("label")[self.start + i].as_py()


class _Folder(_Listed):
    """An image folder, with ``datasets``' imagefolder splits and labels (see
    :mod:`tokenizer.manifest`)."""

    def name(self, i: int) -> str:
        return os.path.join(self.root, self._row(i)[0])

    def load(self, i: int) -> tuple[Image.Image, int]:
        path, label = self._row(i)
        return Image.open(os.path.join(self.root, path)), label


class _Table(_Reader):
    """Rows of a ``datasets.Dataset``: images (PIL, ``{"bytes", "path"}`` dicts, bytes or paths)
    in ``image_column``, integer labels in ``label_column``."""

    def __init__(self, table: Any, source: str, config: DataConfig) -> None:
        self.image_column, self.label_column = config.image_column, config.label_column
        for key, column in (("image_column", self.image_column),
                            ("label_column", self.label_column)):
            if column is not None and column not in table.column_names:
                raise ValueError(f"data config {key}={column!r} is not a column of {source}; "
                                 f"its columns are {table.column_names}")
        feature = table.features.get(self.label_column)  # None when there are no labels
        if not str(getattr(feature, "dtype", "int")).startswith(("int", "uint")):
            raise ValueError(f"data config label_column={self.label_column!r} must hold integer "
                             f"labels, not {feature}")
        self.table = table.select_columns([c for c in (self.image_column, self.label_column) if c])
        self.source = source

    def __len__(self) -> int:
        return len(self.table)

    def name(self, i: int) -> str:
        return f"{self.source} row {i}"

    def load(self, i: int) -> tuple[Image.Image, int]:
        row = self.table[i]
        image = row[self.image_column]
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, str)):
            image = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
        return image, int(row[self.label_column]) if self.label_column else -1


_LMDB_ENVS: dict[str, tuple[int, Any]] = {}  # path → (pid, environment): one per process


def _lmdb_env(path: str) -> Any:
    """This process's read-only environment of the LMDB at ``path`` (LMDB allows one per process;
    one inherited through fork is unusable, so it is closed and reopened)."""
    pid, env = _LMDB_ENVS.get(path, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()
        import lmdb
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False,
                        subdir=os.path.isdir(path))
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


def _reader(config: DataConfig) -> _Reader:
    """The reader behind ``config.source``."""
    source, path = config.source, os.path.expanduser(config.source)
    if source == "digits":
        return _Digits(config)
    if source.startswith("lsun:"):
        return _lmdb_reader(os.path.expanduser(source[len("lsun:"):]), config)
    if os.path.isfile(path):
        if not path.endswith((".parquet", ".arrow")):
            raise ValueError(f"data source {source!r} is a file but not .parquet / .arrow; "
                             f"{ACCEPTED}")
        import datasets
        read = datasets.Dataset.from_file if path.endswith(".arrow") else \
            datasets.Dataset.from_parquet
        return _Table(read(path), source, config)
    saved = any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))
    if os.path.isdir(path) and not saved:
        return _Folder(open_manifest(path, "folder"), config.split)
    if not saved and (source.startswith(("/", ".", "~")) or path.endswith((".parquet", ".arrow"))):
        raise FileNotFoundError(f"data source {source!r} does not exist; {ACCEPTED}")
    import datasets

    if saved:  # a directory written by save_to_disk
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            if config.split not in table:
                raise ValueError(f"data config split={config.split!r} is not in {source}; "
                                 f"its splits are {list(table)}")
            table = table[config.split]
        return _Table(table, source, config)
    try:
        table = datasets.load_dataset(source, split=config.split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, missing split, ...
        raise ValueError(f"the dataset {source!r} (split {config.split!r}) is no local path and "
                         f"could not be loaded from the Hugging Face hub ({err}); without network "
                         f"access set source to a local path: {ACCEPTED}") from err
    return _Table(table, source, config)


def split_indices(count: int, config: DataConfig, part: str) -> np.ndarray:
    """The sorted item indices of ``part``: of a permutation seeded by ``seed``, the last
    ``validation_size`` items (a count, or a rounded fraction, at least 1) are "validation"."""
    size = config.validation_size
    held = size if isinstance(size, int) else max(1, round(size * count))
    if held >= count:
        raise ValueError(f"data config validation_size={size!r} leaves no training images "
                         f"({count} images in all); use a smaller fraction or count")
    order = np.random.RandomState(config.seed).permutation(count)  # frozen stream
    return np.sort(order[:count - held] if part == "train" else order[count - held:])


def build_dataset(config: DataConfig | Mapping[str, Any], part: str = "train") -> ImageDataset:
    """The ``part`` ("train" or "validation") of the dataset described by ``config``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if isinstance(config, Mapping):
        allowed = [f.name for f in fields(DataConfig)]
        unknown = [key for key in config if key not in allowed]
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; allowed keys: {allowed}")
        config = DataConfig(**config)
    elif not isinstance(config, DataConfig):
        raise TypeError(f"config must be a DataConfig or a dict, got {type(config).__name__}")
    reader = _reader(config)
    if len(reader) == 0:
        raise ValueError(f"data source {config.source!r} holds no readable images")
    transform = _transform(config, part == "train", tensors=isinstance(reader, _Digits))
    return ImageDataset(reader, split_indices(len(reader), config, part), transform,
                        config.channels, config.strict)
