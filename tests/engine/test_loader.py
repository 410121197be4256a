"""The training loader of :func:`engine.loader.seeded_batches`: one DataLoader whose workers persist
across epochs, per-item augmentation seeds, exact resume."""

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from engine.config import ConfigError
from engine.data import build_dataset
from engine.loader import seeded_batches

PER_EPOCH = 5  # 10 train items, batches of 2


def _accelerator(processes: int = 1, index: int = 0) -> SimpleNamespace:
    return SimpleNamespace(num_processes=processes, process_index=index, device=torch.device("cpu"))


@pytest.fixture
def augmented(tmp_path: Path):
    """The train part (10 items, 2 classes) of a folder of 16×8 noise images, randomly cropped
    to 8×8 and flipped, and an unreadable one (replaced by the next readable image)."""
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = tmp_path / ("cat" if i % 2 else "dog")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "dog" / "bad.png").write_text("not an image")
    config = {"source": str(tmp_path), "resolution": 8, "crop": "random", "flip": True}
    return build_dataset({**config, "validation_size": 1}, "train")


def _stream(
    dataset, steps: int, num_workers: int, start_step: int = 0, batch_size: int = 2, **kwargs
) -> list:
    accelerator = _accelerator(**kwargs)
    batches = seeded_batches(dataset, batch_size, 1, 7, num_workers, accelerator, start_step)
    stream = [next(batches) for _ in range(steps)]
    batches.close()  # shuts the workers down
    return stream


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_augmentations_do_not_depend_on_the_number_of_workers(augmented):
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="skipping unreadable image .*bad.png"):
        alone = _stream(augmented, 12, 0)  # 2.4 epochs
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG is untouched"
    assert _same(alone, _stream(augmented, 12, 2))
    assert alone[0]["pixel_values"].shape == (2, 3, 8, 8)
    assert not _same(alone[:PER_EPOCH], alone[PER_EPOCH : 2 * PER_EPOCH])


def test_resumed_workers_continue_the_uninterrupted_stream(augmented):
    full = _stream(augmented, 12, 2)
    for start in (3, 7):  # in the first epoch (crossing into the second), in the second
        assert _same(_stream(augmented, 12 - start, 2, start_step=start), full[start:])


class Pids(Dataset):
    """Item i: (i, the pid of the process that loaded it); int indices only."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        assert isinstance(i, int), f"an int index, not {i!r}"
        return torch.tensor([i, os.getpid()])


def test_workers_persist_across_epochs():
    stream = _stream(Pids(), 3 * 5, 2)  # 5 batches per epoch
    pids = [{int(p) for b in stream[e * 5 : e * 5 + 5] for p in b[:, 1]} for e in range(3)]
    assert len(pids[0]) == 2 and os.getpid() not in pids[0]
    assert pids[0] == pids[1] == pids[2], "the same two workers load every epoch"


def test_plain_dataset_keeps_the_seeded_order():
    def order(epoch: int) -> torch.Tensor:
        return torch.randperm(10, generator=torch.Generator().manual_seed(7 * 100_003 + epoch))

    stream = torch.stack([b[:, 0] for b in _stream(Pids(), 10, 0)])
    assert torch.equal(stream, torch.stack([b[:, 0] for b in _stream(Pids(), 10, 2)]))
    assert torch.equal(stream, torch.cat([order(0).view(5, 2), order(1).view(5, 2)]))
    # of two processes, the second takes every other item of each global batch of 4
    second = torch.stack([b[:, 0] for b in _stream(Pids(), 4, 0, processes=2, index=1)])
    assert torch.equal(second, torch.cat([order(e)[:8].view(2, 4)[:, 1::2] for e in (0, 1)]))
    with pytest.raises(ConfigError, match="batch_size=11 × 1 processes is larger than the 10"):
        _stream(Pids(), 1, 0, batch_size=11)
