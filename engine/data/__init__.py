"""Datasets shared by both training stages and FID: scikit-learn's 1,797 real 8×8 digits (the
embedded default), image folders, parquet / arrow / ``save_to_disk`` tables, Hugging Face hub
datasets and LSUN LMDB exports, all preprocessed the same way (see :class:`DataConfig`). Tables
and hub datasets can also be streamed (``streaming: true``, see :mod:`engine.data.streaming`).

Modules, each importing only those before it: ``config`` (the ``data:`` section, what a source
names), ``manifest`` (folders and LMDBs listed once), ``readers`` (one per kind of source, and
the decoding), ``streaming`` (streamed tables), ``dataset`` (:func:`build_dataset`: the parts, the
split, the transforms). The names below are the package's public ones."""

from .config import ACCEPTED, DataConfig, check_source_exists, source_kind
from .dataset import (
    IMAGE_CHOICE,
    PARTS,
    ImageDataset,
    ReadableItems,
    build_dataset,
    build_transform,
    collate_readable,
    describe_parts,
    held_out_split,
    image_choice,
    split_indices,
)
from .readers import (
    DecodeImages,
    DigitsReader,
    FolderReader,
    LmdbReader,
    Reader,
    TableReader,
    UnreadableImageError,
    class_names,
    digits,
    open_image,
    open_reader,
    open_table,
    source_splits,
    to_mode,
)
from .streaming import ExampleDecoder, ImageStream, build_stream, held_out_reader

__all__ = [
    "ACCEPTED",
    "IMAGE_CHOICE",
    "PARTS",
    "DataConfig",
    "DecodeImages",
    "DigitsReader",
    "ExampleDecoder",
    "FolderReader",
    "ImageDataset",
    "ImageStream",
    "LmdbReader",
    "ReadableItems",
    "Reader",
    "TableReader",
    "UnreadableImageError",
    "build_dataset",
    "build_stream",
    "build_transform",
    "check_source_exists",
    "class_names",
    "collate_readable",
    "describe_parts",
    "digits",
    "held_out_reader",
    "held_out_split",
    "image_choice",
    "open_image",
    "open_reader",
    "open_table",
    "source_kind",
    "source_splits",
    "split_indices",
    "to_mode",
]
