"""Streamed sources (``data.streaming: true``): a hub dataset, a .parquet / .arrow file or a
``save_to_disk`` folder read with ``datasets``' streaming, so that training starts without a
download or an Arrow conversion of the whole dataset.

- *validation part*: the first ``validation_size`` examples of the stream (an integer), read once
  into memory (:func:`held_out_reader`); a map-style :class:`~engine.data.dataset.ImageDataset`
  like any other part.
- *train part*: an :class:`ImageStream` (:func:`build_stream`), the rest of the stream. An
  example whose image bytes (or path) equal those of a held-out one is never trained on, wherever
  it is in the stream.
- *batches* (:func:`engine.loader.stream_batches`, the counterpart of
  :func:`engine.loader.seeded_batches`): each process reads its own shards (files) of the stream,
  ``num_shards / processes`` of them, the same ones every epoch; when the shards do not divide
  among the processes, each process reads the whole stream and keeps every N-th example
  (``split_dataset_by_node``'s "examples" strategy). Its examples pass through a shuffle buffer
  of ``shuffle_buffer_size`` undecoded examples seeded with ``train.seed`` and reshuffled every
  epoch (``set_epoch``, which also shuffles the order of the shards). Epochs follow each other
  without a gap: micro-batches run across epoch ends. Images are decoded in the loader workers;
  the examples are read, in order, in the training process.
- *resuming* at step s continues with exactly the examples an uninterrupted run would have seen:
  each process skips s × accumulation × batch_size examples without decoding them. An epoch of a
  process always holds the same number of examples (its shards are fixed; with shards of unequal
  sizes the processes' epochs differ in length and drift apart, which is harmless), so resuming
  reads its first epoch, to count it, and the skipped start of the epoch it resumes in; whole
  epochs in between are not read. (``IterableDataset.state_dict`` would not need the reading but
  is not exact: it drops the shuffle buffer.)

Detect a stream with ``isinstance(dataset, ImageStream)``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from ..config import ConfigError
from .readers import (
    DecodeImages,
    TableReader,
    image_name,
    open_table,
    skip_unreadable,
    table_columns,
)

if TYPE_CHECKING:  # annotations only: at run time a stream needs the readers alone
    from .config import DataConfig


def image_digest(value: Any) -> bytes:
    """A 16-byte digest of an undecoded image: of its bytes, else of its path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or b""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, Image.Image):
        value = value.tobytes()
    elif not isinstance(value, bytes):
        value = repr(value).encode()
    return hashlib.blake2b(value, digest_size=16).digest()


class _NotHeldOut:
    """``IterableDataset.filter`` function: whether an image is none of the held-out ones."""

    def __init__(self, digests: frozenset[bytes]) -> None:
        self.digests = digests

    def __call__(self, image: Any) -> bool:
        return image_digest(image) not in self.digests


class ExampleDecoder:
    """Turns an undecoded example into an item, ``{"pixel_values", "label"}``; an unreadable
    image is named and recorded in ``skipped`` (or raises with ``strict``)."""

    def __init__(self, config: DataConfig, transform: Callable) -> None:
        self.source, self.strict, self.transform = config.source, config.strict, transform
        self.image_column = config.image_column
        self.decode = DecodeImages(config.image_column, config.label_column, config.channels)
        self.skipped: list[str] = []

    def decode_row(self, row: dict[str, Any], fallback: str) -> tuple[Image.Image, int] | None:
        """The decoded image and label of ``row``, or None if the image is unreadable."""
        try:
            out = self.decode({column: [value] for column, value in row.items()})
            return out["image"][0], out["label"][0]
        except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"
            name = image_name(self.source, row.get(self.image_column), fallback)
            skip_unreadable(name, err, self.strict, self.skipped)
            return None

    def item(self, image: Image.Image, label: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.transform(image),
            "label": torch.tensor(label, dtype=torch.long),
        }


class ImageStream(IterableDataset):
    """The train part of a streamed source: iterating it yields ``{"pixel_values", "label"}``
    items in stream order, once (an unreadable image is named and skipped, or raises with
    ``strict``; in loader workers each worker takes its shards, as ``datasets`` does). Train on
    it with :func:`engine.loader.stream_batches`. ``rows`` is the undecoded
    ``datasets.IterableDataset`` of the part (image and label columns, the held-out examples
    filtered out), ``held_out`` the size of the validation part before it, ``decoder`` what
    turns an example into an item, ``skipped`` the unreadable images found in this process."""

    def __init__(self, rows: Any, config: DataConfig, transform: Callable, held_out: int) -> None:
        self.rows, self.held_out, self.source = rows, held_out, config.source
        self.buffer_size = config.shuffle_buffer_size
        self.decoder = ExampleDecoder(config, transform)

    @property
    def skipped(self) -> list[str]:
        return self.decoder.skipped

    def __len__(self) -> int:
        raise TypeError(
            f"the train part of {self.source} is a stream (data.streaming: true) and has no "
            "length; use the validation part or set data.streaming: false"
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for k, row in enumerate(self.rows):
            decoded = self.decoder.decode_row(row, f"{self.source} train example {k}")
            if decoded is not None:
                yield self.decoder.item(*decoded)

    def process_rows(self, rank: int, world_size: int, seed: int) -> Any:
        """The undecoded examples of process ``rank`` of ``world_size``, in a shuffle buffer
        seeded with ``seed`` (``set_epoch`` chooses the epoch's order). Each process keeps the
        same shards every epoch (``split_dataset_by_node`` would deal them out anew each epoch),
        so that its epochs all have the same length."""
        rows = self.rows
        if world_size > 1 and rows.num_shards % world_size == 0:
            rows = rows.shard(num_shards=world_size, index=rank, contiguous=False)
        elif world_size > 1:
            from datasets.distributed import split_dataset_by_node

            warnings.warn(
                f"{self.source}: its {rows.num_shards} shard(s) do not divide among "
                f"{world_size} processes, so each process reads the whole stream and keeps "
                f"every {world_size}th example; data in a multiple of {world_size} files "
                "avoids that",
                stacklevel=2,
            )
            rows = split_dataset_by_node(rows, rank, world_size)  # "examples": no divisor
        return rows.shuffle(seed=seed, buffer_size=self.buffer_size)

    def examples(self, rank: int, world_size: int, seed: int, skip: int = 0) -> Iterator[dict]:
        """Process ``rank``'s undecoded examples, epoch after epoch without end, from the
        ``skip``-th on (skipped examples are read but not decoded; once an epoch has been read
        its length is known and whole epochs are skipped without reading)."""
        rows, epoch, length = self.process_rows(rank, world_size, seed), 0, None
        while True:
            if length:
                epoch, skip = epoch + skip // length, skip % length
            rows.set_epoch(epoch)
            count = 0
            for row in rows:
                count += 1
                if count > skip:
                    yield row
            if count == 0:
                raise ConfigError(
                    f"process {rank} of {world_size} got no training examples of "
                    f"{self.source} (data.validation_size={self.held_out} held out); the "
                    "stream must hold more examples than processes"
                )
            skip, length, epoch = max(0, skip - count), count, epoch + 1


_HEADS: dict[tuple, list[dict]] = {}  # the last streams' first examples, read once per process


def _head(config: DataConfig, stream: Any) -> list[dict]:
    """The first ``validation_size`` + 1 undecoded examples of ``stream`` (fewer if it is
    shorter), remembered for the other part built in the same process."""
    path = os.path.expanduser(config.source)
    key = (
        config.source,
        config.split,
        config.dataset_config_name,
        config.cache_dir,
        config.image_column,
        config.label_column,
        config.validation_size,
        os.stat(path).st_mtime_ns if os.path.exists(path) else None,
    )
    if key not in _HEADS:
        if len(_HEADS) >= 2:
            _HEADS.pop(next(iter(_HEADS)))
        _HEADS[key] = list(stream.take(config.validation_size + 1))
    return _HEADS[key]


def _open_stream(config: DataConfig) -> tuple[Any, list[dict]]:
    """The undecoded stream of ``config`` (image and label columns) and its first examples."""
    import datasets

    stream = table_columns(open_table(config), config.source, config)
    feature = stream.features.get(config.image_column) if stream.features else None
    if isinstance(feature, datasets.Image):  # decoded in the workers, after the shuffle buffer
        stream = stream.cast_column(config.image_column, datasets.Image(decode=False))
    size, head = config.validation_size, _head(config, stream)
    if len(head) <= size:
        raise ValueError(
            f"data config validation_size={size!r} leaves no training images (the stream "
            f"holds {len(head)} images); use a smaller count"
        )
    return stream, head


def held_out_reader(config: DataConfig) -> TableReader:
    """The validation part of the streamed source of ``config``: its first ``validation_size``
    examples, read into memory, as a table."""
    import datasets

    stream, head = _open_stream(config)
    table = datasets.Dataset.from_list(head[: config.validation_size], features=stream.features)
    return TableReader(table, config.source, config)


def build_stream(config: DataConfig, transform: Callable) -> ImageStream:
    """The train part of the streamed source of ``config``, its items made by ``transform``:
    the examples after the first ``validation_size``, none of them a held-out image."""
    stream, head = _open_stream(config)
    size = config.validation_size
    held_out = frozenset(image_digest(row[config.image_column]) for row in head[:size])
    rows = stream.filter(_NotHeldOut(held_out), input_columns=[config.image_column])
    return ImageStream(rows, config, transform, size)
