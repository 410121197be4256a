"""The training loaders: endless per-process micro-batches that a resumed run continues exactly
where it stopped. :func:`seeded_batches` for a map-style dataset (a seeded order per epoch,
:class:`EpochBatches`), :func:`stream_batches` for a stream
(:class:`~engine.data.streaming.ImageStream`); :meth:`engine.run.Run.batches` picks one."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from .config import ConfigError
from .data import ExampleDecoder, ImageStream


class EpochBatches:
    """The batch sampler of :func:`seeded_batches`: each iteration yields this process's
    micro-batches of the next epoch (the first one from ``start_step`` on), lists of indices, or
    of (index, augmentation seed) pairs for a dataset whose class sets ``seeded_items``, so that
    an item's augmentation depends on (seed, epoch, item) only, not on the worker or process
    that loads it. An epoch is claimed when its first batch is drawn: a DataLoader's first
    iterator calls ``iter`` twice and uses the second."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        accumulation: int,
        seed: int,
        accelerator: Accelerator,
        start_step: int = 0,
    ) -> None:
        self.length, self.batch_size, self.seed = len(dataset), batch_size, seed
        self.seeded = bool(getattr(dataset, "seeded_items", False))
        self.processes, self.rank = accelerator.num_processes, accelerator.process_index
        self.per_step = batch_size * self.processes
        self.per_epoch = self.length // self.per_step
        if self.per_epoch == 0:
            raise ConfigError(
                f"train.batch_size={batch_size} × {self.processes} "
                f"processes is larger than the {self.length} training items"
            )
        self.epoch, self.skip = divmod(start_step * accumulation, self.per_epoch)

    def __iter__(self) -> Iterator[list]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        # a private generator: drawing the order must not consume the global RNG stream
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.length, generator=generator)[: self.per_epoch * self.per_step]
        # each process takes every N-th sample of a global batch; batches are made as the loader
        # asks for them: no Python list of the epoch's indices
        mine = order.view(self.per_epoch, self.per_step)[skip:, self.rank :: self.processes]
        # an item's augmentation seed is a function of (seed, epoch, item): no second array
        base = (self.seed * 100_003 + epoch) * 2**31 % 2**62  # + item: a valid torch seed
        for batch in mine.reshape(-1, self.batch_size):
            indices = batch.tolist()
            yield [(i, base + i) for i in indices] if self.seeded else indices


def seeded_batches(
    dataset: Dataset,
    batch_size: int,
    accumulation: int,
    seed: int,
    num_workers: int,
    accelerator: Accelerator,
    start_step: int = 0,
):
    """Endless per-process micro-batches in a seeded per-epoch order (:class:`EpochBatches`),
    from one DataLoader whose workers persist across epochs; starting at ``start_step`` skips
    exactly the micro-batches already consumed, without loading them, so a resumed run sees the
    same data."""
    sampler = EpochBatches(dataset, batch_size, accumulation, seed, accelerator, start_step)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # a private generator: the workers' seeds must not consume the global RNG stream
        generator=torch.Generator().manual_seed(seed),
        pin_memory=accelerator.device.type == "cuda",
    )
    while True:
        yield from loader  # one epoch per pass


class _BatchDecoder(Dataset):
    """What the stream loader's workers run on: a micro-batch of undecoded examples (the
    loader's "indices") becomes a list of items, made by ``decoder``. An unreadable image is
    replaced by the next readable one of its batch, so that batches keep their size."""

    def __init__(self, decoder: ExampleDecoder) -> None:
        self.decoder = decoder

    def __getitem__(self, row: dict) -> dict[str, torch.Tensor]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[dict]) -> list[dict[str, torch.Tensor]]:
        fallback = f"{self.decoder.source} example (an image without a path)"
        decoded = [self.decoder.decode_row(row, fallback) for row in rows]
        good = [k for k, d in enumerate(decoded) if d is not None]
        if not good:
            raise RuntimeError(
                f"no readable image in a batch of {len(rows)} examples of {self.decoder.source}"
            )
        items = {k: self.decoder.item(*decoded[k]) for k in good}
        return [items[good[bisect.bisect_left(good, k) % len(good)]] for k in range(len(rows))]


def stream_batches(
    dataset: ImageStream,
    batch_size: int,
    accumulation: int,
    seed: int,
    num_workers: int,
    accelerator: Any,
    start_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless per-process micro-batches of the stream ``dataset``, as :func:`seeded_batches`
    makes them of a map-style dataset: each process its own part of the stream (see
    :mod:`engine.data.streaming`), shuffled with ``seed`` and reshuffled every epoch; starting
    at ``start_step`` skips, undecoded, the start_step × accumulation × batch_size examples each
    process had consumed, so a resumed run sees the same data."""
    if not isinstance(dataset, ImageStream):
        raise TypeError(f"stream_batches needs an ImageStream, got {type(dataset).__name__}")
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = dataset.examples(rank, world, seed, skip=start_step * accumulation * batch_size)
    loader = DataLoader(
        _BatchDecoder(dataset.decoder),
        batch_sampler=iter(lambda: list(islice(rows, batch_size)), None),  # endless
        num_workers=num_workers,
        # a private generator: creating a loader must not consume the global RNG stream
        generator=torch.Generator().manual_seed(seed * 100_003 + start_step),
        pin_memory=accelerator.device.type == "cuda",
    )
    yield from loader
