"""Streamed sources (data.streaming: true), all offline: local parquet files go through
``load_dataset("parquet", data_files=..., streaming=True)``, the builder a hub parquet dataset
goes through too; a "hub" name is served by a monkeypatched ``load_dataset`` over local files."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ConfigError
from engine.data import ImageDataset, UnreadableImageError, build_dataset
from tests.launch import ROOT, launch_two_processes

datasets = pytest.importorskip("datasets")

from engine.data import ImageStream, streaming  # noqa: E402
from engine.loader import stream_batches  # noqa: E402

HELD_OUT = 3
TRAIN = 16  # examples 3..18; example 19 is a copy of held-out image 0 (label 99)


class Process(SimpleNamespace):
    device = torch.device("cpu")

    def __init__(self, rank: int = 0, world: int = 1):
        super().__init__(process_index=rank, num_processes=world)


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    # datasets sleeps 5 s at the end of each epoch of a parquet stream (an Arrow work-around)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    streaming._HEADS.clear()


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _table(labels: list[int], images: list[bytes]):
    features = datasets.Features({"img": datasets.Image(), "y": datasets.Value("int64")})
    rows = [{"bytes": b, "path": f"img{y}.png"} for b, y in zip(images, labels, strict=True)]
    return datasets.Dataset.from_dict({"img": rows, "y": labels}, features=features)


def write_parquet(folder: Path, files: int = 1) -> list[str]:
    """Examples 0..18 (label = index) and a copy of image 0 labelled 99, in ``files`` files."""
    labels = [*range(HELD_OUT + TRAIN), 99]
    images = [_png(i) for i in range(HELD_OUT + TRAIN)] + [_png(0)]
    table, paths = _table(labels, images), []
    for k in range(files):
        paths.append(str(folder / f"part-{k}.parquet"))
        table.shard(files, k, contiguous=True).to_parquet(paths[-1])
    return paths


def one_file(tmp_path: Path) -> str:
    """The examples in a single parquet file (one shard)."""
    (tmp_path / "one").mkdir()
    return write_parquet(tmp_path / "one")[0]


def config(source: str, **change) -> dict:
    return {
        "source": source,
        "streaming": True,
        "validation_size": HELD_OUT,
        "image_column": "img",
        "label_column": "y",
        "resolution": 8,
        "shuffle_buffer_size": 6,
        **change,
    }


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list:
    """ "someone/images" is two parquet files (two shards), loaded as the hub would load them;
    returns the load_dataset calls."""
    files, calls, load = write_parquet(tmp_path, files=2), [], datasets.load_dataset

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return load("parquet", data_files=files, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def labels(batches) -> list[int]:
    return [int(y) for batch in batches for y in batch["label"]]


def test_validation_is_the_head_of_the_stream_and_never_trained_on(tmp_path: Path) -> None:
    (path,) = write_parquet(tmp_path)
    validation = build_dataset(config(path), "validation")
    assert isinstance(validation, ImageDataset) and len(validation) == HELD_OUT
    assert [int(validation[i]["label"]) for i in range(HELD_OUT)] == [0, 1, 2]
    assert validation[0]["pixel_values"].shape == (3, 8, 8)
    train = build_dataset(config(path), "train")
    assert isinstance(train, ImageStream) and train.held_out == HELD_OUT
    items = list(train)  # stream order; 99 (a copy of held-out image 0) is left out
    assert [int(item["label"]) for item in items] == list(range(HELD_OUT, HELD_OUT + TRAIN))
    assert all(item["pixel_values"].shape == (3, 8, 8) for item in items)
    with pytest.raises(TypeError, match="stream.*no length.*validation part"):
        len(train)
    with pytest.raises(ValueError, match="validation_size=20 leaves no training images"):
        build_dataset(config(path, validation_size=20), "train")


def test_hub_stream_gets_name_cache_dir_and_streaming(hub, tmp_path: Path) -> None:
    change = {"dataset_config_name": "full", "cache_dir": str(tmp_path / "c"), "split": "x"}
    train = build_dataset(config("someone/images", **change), "train")
    assert train.rows.num_shards == 2
    assert hub[0] == (
        "someone/images",
        dict(name="full", split="x", cache_dir=str(tmp_path / "c"), streaming=True),
    )


@pytest.mark.parametrize("source", ["parquet", "hub"])
def test_resumed_stream_continues_the_uninterrupted_one(source: str, hub, tmp_path) -> None:
    name = "someone/images" if source == "hub" else one_file(tmp_path)
    train = build_dataset(config(name), "train")
    full = stream_batches(train, 3, 2, 0, 0, Process())  # batch 3, accumulation 2
    batches = [next(full) for _ in range(2 * 14)]  # 84 examples: five epochs and a bit
    seen = labels(batches)
    epochs = [seen[k : k + TRAIN] for k in range(0, 5 * TRAIN, TRAIN)]
    assert all(sorted(epoch) == list(range(HELD_OUT, HELD_OUT + TRAIN)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 5, "each epoch is shuffled anew"
    for start in (1, 5, 11):  # within the first epoch, within the third, in the sixth
        resumed = stream_batches(train, 3, 2, 0, 0, Process(), start_step=start)
        for expected in batches[2 * start : 2 * start + 4]:
            got = next(resumed)
            assert torch.equal(got["label"], expected["label"]), start
            assert torch.equal(got["pixel_values"], expected["pixel_values"]), start
    other_seed = stream_batches(train, 3, 2, 1, 0, Process())
    assert labels(next(other_seed) for _ in range(5)) != seen[:15]


@pytest.mark.parametrize("shards", [1, 2])  # 1: every 2nd example each; 2: a file each
def test_two_processes_read_disjoint_parts_that_cover_the_stream(
    shards: int, hub, tmp_path: Path
) -> None:
    name = "someone/images" if shards == 2 else one_file(tmp_path)
    train = build_dataset(config(name), "train")
    parts = []
    for rank in (0, 1):
        rows = train.process_rows(rank, 2, seed=0)
        epochs = []
        for epoch in range(3):
            rows.set_epoch(epoch)
            epochs.append([row["y"] for row in rows])
        assert len({len(e) for e in epochs}) == 1, "every epoch of a process has one length"
        parts.append(epochs)
        flat = epochs[0] + epochs[1] + epochs[2]  # what stream_batches makes batches of
        batches = stream_batches(train, 2, 1, 0, 0, Process(rank, 2))
        assert labels(next(batches) for _ in range(4)) == flat[:8]
        resumed = stream_batches(train, 2, 1, 0, 0, Process(rank, 2), start_step=5)
        assert labels(next(resumed) for _ in range(2)) == flat[10:14]
    for epoch in range(3):
        zero, one = parts[0][epoch], parts[1][epoch]
        assert not set(zero) & set(one)
        assert sorted(zero + one) == list(range(HELD_OUT, HELD_OUT + TRAIN))
    if shards == 2:  # each process keeps its file; the order within it changes
        assert all(set(e) == set(parts[0][0]) for e in parts[0]) and parts[0][0] != parts[0][1]


def test_loader_workers_decode_the_same_batches(tmp_path: Path) -> None:
    (path,) = write_parquet(tmp_path)
    train = build_dataset(config(path), "train")
    plain = stream_batches(train, 4, 1, 0, 0, Process())
    workers = stream_batches(train, 4, 1, 0, 2, Process())
    for _ in range(6):
        a, b = next(plain), next(workers)
        assert torch.equal(a["label"], b["label"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    workers.close()


def test_unreadable_image_is_named_and_replaced_within_its_batch(tmp_path: Path) -> None:
    images = [_png(i) for i in range(8)]
    images[5] = b"broken"
    _table(list(range(8)), images).to_parquet(str(tmp_path / "data.parquet"))
    path = str(tmp_path / "data.parquet")
    train = build_dataset(config(path, validation_size=1, shuffle_buffer_size=1), "train")
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*img5\.png"):
        batches = [next(stream_batches(train, 7, 1, 0, 0, Process()))]
    assert batches[0]["pixel_values"].shape == (7, 3, 8, 8)
    assert sorted(labels(batches)) == [1, 2, 3, 4, 6, 6, 7]  # 5 → the next readable one
    assert train.skipped == [f"{path} image img5.png"]
    strict = build_dataset(config(path, validation_size=1, strict=True), "train")
    with pytest.raises(UnreadableImageError, match=r"img5\.png.*strict: false"):
        next(stream_batches(strict, 7, 1, 0, 0, Process()))


def test_save_to_disk_folder_streams_one_shard_per_file(tmp_path: Path) -> None:
    labels_ = list(range(10))
    _table(labels_, [_png(i) for i in labels_]).save_to_disk(str(tmp_path / "s"), num_shards=2)
    train = build_dataset(config(str(tmp_path / "s"), validation_size=2), "train")
    assert train.rows.num_shards == 2
    assert sorted(int(item["label"]) for item in train) == labels_[2:]


def test_latent_cache_refuses_a_stream(tiny_tokenizer, tmp_path: Path) -> None:
    from diffusion.latent_cache import build_latent_cache

    data = config("someone/images")
    with pytest.raises(ConfigError, match=r"data.streaming = True.*streaming: false") as error:
        build_latent_cache(tiny_tokenizer(), data, tmp_path / "cache")
    assert "\n" not in str(error.value) and not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("files", [1, 2])
def test_two_real_processes_get_disjoint_shards(files: int, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    if files == 1:
        source = write_parquet(folder)[0]
    else:  # a save_to_disk folder of two files: two shards
        count = HELD_OUT + TRAIN
        table = _table(list(range(count)), [_png(i) for i in range(count)])
        table.save_to_disk(str(folder / "saved"), num_shards=2)
        source = str(folder / "saved")
    reports = tmp_path / "reports"
    reports.mkdir()
    launch_two_processes(
        ROOT / "tests" / "workers" / "stream_worker.py",
        json.dumps(config(source)),
        str(reports),
        port=29561 + files,
    )
    seen = [json.loads((reports / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in seen] == [2, 2]
    zero, one = seen[0]["epoch"], seen[1]["epoch"]
    assert not set(zero) & set(one)
    assert sorted(zero + one) == list(range(HELD_OUT, HELD_OUT + TRAIN))
    assert all(r["batches"] == r["epoch"][: len(r["batches"])] for r in seen)
