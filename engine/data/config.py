"""The ``data:`` config section (:class:`DataConfig`) and what a ``source`` names: its kind
(:func:`source_kind`), the keys each kind has a use for (checked once, when the config is made)
and whether a local source exists (:func:`check_source_exists`, which needs the data present)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import check_types, require

ACCEPTED = (
    "source accepts 'digits', a local image folder, a .parquet / .arrow file, a datasets "
    "save_to_disk directory, 'lsun:/path/to/lmdb' or a Hugging Face hub dataset name"
)


@dataclass
class DataConfig:
    """Where the images come from and how they are preprocessed (the ``data:`` config section).

    source: ``"digits"`` (scikit-learn's 1,797 8×8 digits, labels 0-9); a local image folder
        (recursive, split folders and class labels as ``datasets``' imagefolder reads them; listed
        once into a shared manifest, see :mod:`engine.data.manifest`); a ``.parquet`` /
        ``.arrow`` file or ``save_to_disk`` directory; ``"lsun:PATH"``, an LSUN LMDB export
        (``pip install lmdb``); else a hub dataset name.
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
        first step. The train part is then an :class:`engine.data.streaming.ImageStream` (each
        process reads its own shards, in a seeded shuffle buffer reshuffled each epoch; resumed
        exactly); the validation part is its first ``validation_size`` examples (an integer),
        read once into memory and never trained on. Image folders, LMDBs and digits are already
        read lazily, image by image, and refuse it.
    shuffle_buffer_size: streams only: examples in the shuffle buffer (``IterableDataset.shuffle``'s
        ``buffer_size``), undecoded: about the file size of that many images in memory.

    ``dataset_config_name``, ``cache_dir`` and ``streaming`` set for a source that has no use for
    them are refused here, naming the key and the fix (a local path that does not exist yet is
    not refused: reading it, or :func:`check_source_exists`, says what is wrong with it).
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
        _check_source_keys(self)


KINDS = {  # what each kind of source is, as the refusals below say it
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


def _check_source_keys(config: DataConfig) -> None:
    """Refuse, with a ConfigError naming the key and the fix, ``dataset_config_name`` for a
    source that is not on the hub, ``cache_dir`` for one that ``datasets`` does not cache and
    ``streaming`` for one that is already read image by image."""
    kind = source_kind(config.source)
    if kind in ("file", "missing"):
        return  # reading the source says what is wrong with it
    what = f"{config.source!r} is {KINDS[kind]}"
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


def check_source_exists(config: DataConfig) -> None:
    """Raise a ConfigError, before anything is built, if ``data.source`` names a local path
    (absolute, ``./``, ``~``, ``lsun:PATH``, a .parquet / .arrow file) that does not exist. (The
    keys the source has no use for were refused when ``config`` was made.)"""
    source = config.source
    path = os.path.expanduser(source[len("lsun:") :] if source.startswith("lsun:") else source)
    local = source.startswith(("lsun:", "/", ".", "~")) or path.endswith((".parquet", ".arrow"))
    require(
        not local or os.path.exists(path),
        "data.source",
        source,
        f"no such file or folder; {ACCEPTED}",
    )
