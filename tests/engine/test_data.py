import io
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DataConfig, build_dataset
from tests.launch import ROOT


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _items(config: dict) -> list[dict]:
    """Every item of both parts (no randomness unless the config asks for it)."""
    return [
        part[i]
        for name in ("train", "validation")
        for part in [build_dataset(config, name)]
        for i in range(len(part))
    ]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """cat/: 3 good images; dog/: 2 good images and 3 bad ones (sorted first: empty.png)."""
    root = tmp_path / "tree"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    _noise((40, 30)).save(root / "cat" / "rgb.png")
    Image.fromarray(np.full((20, 50), 128, np.uint8)).save(root / "cat" / "gray.png")
    Image.new("RGBA", (33, 17), (10, 200, 30, 128)).save(root / "cat" / "rgba.png")
    _noise((24, 24)).convert("P").save(root / "dog" / "palette.png")
    Image.fromarray(np.full((18, 36), 40000, np.uint16)).save(root / "dog" / "sixteen.png")
    (root / "dog" / "empty.png").write_bytes(b"")
    data = _png_bytes(_noise((64, 64), 1))
    (root / "dog" / "trunc.png").write_bytes(data[: len(data) // 2])
    (root / "dog" / "x.png").write_text("this is not an image")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_folder_items_labels_and_skipped_files(tree: Path) -> None:
    config = {"source": str(tree), "resolution": 16, "validation_size": 1}
    train = build_dataset(config, "train")  # lists names only: nothing is decoded yet
    assert train.skipped == [] and len(train) == 7
    with pytest.warns(UserWarning) as record:
        items = [train[i] for i in range(len(train))]
    messages = " ".join(str(w.message) for w in record)
    bad = ["empty.png", "trunc.png", "x.png"]
    assert all(name in messages for name in bad)
    assert sorted(Path(p).name for p in train.skipped) == bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        validation = build_dataset(config, "validation")
        items.append(validation[0])
    for item in items:
        x = item["pixel_values"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    # an unreadable image is replaced by the next readable one: 3 cats and 2 dogs in all
    assert {int(item["label"]) for item in items} == {0, 1}


def test_strict_raises_naming_the_bad_file(tree: Path) -> None:
    dataset = build_dataset({"source": str(tree), "strict": True, "validation_size": 1})
    with pytest.raises(ValueError, match=r"unreadable image .*(empty|trunc|x)\.png.*strict"):
        [dataset[i] for i in range(len(dataset))]


def _imagefolder_tree(root: Path) -> None:
    """Split folders with partly different classes, a hidden folder, a stray top-level folder."""
    for split, classes in (("train", ["cat", "dog", "zebra"]), ("validation", ["dog", "ant"])):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / name / f"{i}.png")
    (root / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".cache" / "hidden.png")
    (root / "extra").mkdir()
    Image.new("RGB", (8, 8)).save(root / "extra" / "outside_the_splits.png")


def test_folder_splits_and_labels_are_those_of_datasets_imagefolder(
    tmp_path: Path, monkeypatch
) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    root = tmp_path / "images"
    _imagefolder_tree(root)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(root))
    assert sorted(theirs) == ["train", "validation"]

    def rows(*parts):
        return sorted(
            (os.path.relpath(part.reader.name(int(j)), root), int(part[i]["label"]))
            for part in parts
            for i, j in enumerate(part.indices)
        )

    def expected(split):
        return sorted(
            (os.path.relpath(row["image"].filename, os.path.realpath(root)), row["label"])
            for row in theirs[split]
        )

    # training on "train": the folder's own validation/ split is the held-out part, whole
    config = {"source": str(root), "resolution": 8, "validation_size": 1}
    assert rows(build_dataset(config, "train")) == expected("train")
    assert rows(build_dataset(config, "validation")) == expected("validation")
    # training on "validation" (no other held-out split): a seeded slice of it is held out
    config["split"] = "validation"
    train, held = build_dataset(config, "train"), build_dataset(config, "validation")
    assert len(held) == 1 and rows(train, held) == expected("validation")
    with pytest.raises(ValueError, match=r"split='test'.*splits are \['train', 'validation'\]"):
        build_dataset({"source": str(root), "split": "test"})


def test_folder_is_listed_once_and_again_when_it_changes(tmp_path: Path, capfd) -> None:
    root = tmp_path / "images"
    _imagefolder_tree(root)
    config = {"source": str(root), "resolution": 8, "validation_size": 1}
    assert len(build_dataset(config, "train")) == 6  # the train/ split; validation/ held out
    assert "listing" in capfd.readouterr().err
    build_dataset(config, "validation")  # the other part, another process: the same manifest
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from engine.data import "
            "build_dataset; build_dataset({'source': sys.argv[1]})",
            str(root),
        ],
        cwd=ROOT,
        check=True,
    )
    assert "listing" not in capfd.readouterr().err
    Image.new("RGB", (8, 8)).save(root / "train" / "cat" / "new.png")
    assert len(build_dataset(config, "train")) == 7
    err = capfd.readouterr().err
    assert "listing" in err and "train/cat changed" in err


def test_folder_without_class_folders_has_no_labels(tmp_path: Path) -> None:
    for i in range(3):
        _noise((20, 20), i).save(tmp_path / f"{i}.jpg")
    items = _items({"source": str(tmp_path), "resolution": 8, "validation_size": 1})
    assert [int(item["label"]) for item in items] == [-1, -1, -1]


def test_sixteen_bit_range_is_preserved(tmp_path: Path) -> None:
    for value in (0, 32768, 65535):
        image = Image.fromarray(np.full((12, 20), value, np.uint16))
        assert image.mode == "I;16"
        image.save(tmp_path / f"{value}.png")
    items = _items({"source": str(tmp_path), "resolution": 8, "validation_size": 1})
    means = sorted(item["pixel_values"].mean().item() for item in items)
    assert means == pytest.approx([-1.0, 0.0, 1.0], abs=0.01)
    assert all(item["pixel_values"].std() < 1e-6 for item in items)


def test_modes_become_the_requested_channels(tmp_path: Path) -> None:
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "a_transparent.png")
    Image.new("L", (10, 10), 0).save(tmp_path / "b_black_gray.png")
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "c_transparent_palette.png", transparency=0)
    config = {"source": str(tmp_path), "resolution": 8, "validation_size": 1, "seed": 0}
    rgb = sorted(
        (round(item["pixel_values"].mean().item()), tuple(item["pixel_values"].shape))
        for item in _items(config)
    )
    # transparent RGBA and palette → white; black grayscale → 3 black channels
    assert rgb == [(-1, (3, 8, 8)), (1, (3, 8, 8)), (1, (3, 8, 8))]
    gray = _items({**config, "channels": 1})
    assert all(item["pixel_values"].shape == (1, 8, 8) for item in gray)


def test_center_crop_keeps_the_centre(tmp_path: Path) -> None:
    array = np.zeros((32, 96), np.uint8)
    array[:, 32:64] = 255  # black | white | black
    for i in range(2):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    config = {"source": str(tmp_path), "resolution": 16, "validation_size": 1}
    for item in _items(config):
        assert item["pixel_values"].shape == (3, 16, 16)
        assert item["pixel_values"].min() > 0.5  # the dark side bands are cropped away
    cropped = _items({**config, "crop": "random", "validation_size": 1})
    assert cropped[0]["pixel_values"].shape == (3, 16, 16)


def test_random_flip_only_on_train(tmp_path: Path) -> None:
    array = np.zeros((8, 8), np.uint8)
    array[:, 4:] = 255  # dark left, bright right
    for i in range(2):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    config = {"source": str(tmp_path), "resolution": 8, "validation_size": 1, "flip": True}
    torch.manual_seed(0)

    def dark_left(dataset) -> list[bool]:
        return [bool(dataset[0]["pixel_values"][:, :, 0].mean() < 0) for _ in range(30)]

    assert set(dark_left(build_dataset(config, "train"))) == {True, False}
    assert set(dark_left(build_dataset(config, "validation"))) == {True}
    assert set(dark_left(build_dataset({**config, "flip": False}, "train"))) == {True}


SPLIT_SCRIPT = (
    "import sys; from engine.data import build_dataset; "
    "print(build_dataset({'source': sys.argv[1], 'validation_size': 0.3, 'seed': 5},"
    " 'validation').indices.tolist())"
)


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    for i in range(20):
        _noise((8, 8), i).save(tmp_path / f"{i:02d}.png")
    config = {"source": str(tmp_path), "resolution": 8, "validation_size": 0.3, "seed": 5}
    train, validation = build_dataset(config, "train"), build_dataset(config, "validation")
    assert len(validation) == 6 and len(train) == 14
    assert set(train.indices.tolist()).isdisjoint(validation.indices.tolist())
    assert sorted([*train.indices, *validation.indices]) == list(range(20))
    assert np.array_equal(build_dataset(config, "validation").indices, validation.indices)
    assert not np.array_equal(
        build_dataset({**config, "seed": 6}, "validation").indices, validation.indices
    )
    out = subprocess.run(
        [sys.executable, "-c", SPLIT_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == str(validation.indices.tolist())  # same in another


def test_digits_source() -> None:
    train = build_dataset({"resolution": 16, "validation_size": 97}, "train")
    validation = build_dataset({"resolution": 16, "validation_size": 97}, "validation")
    assert (len(train), len(validation)) == (1700, 97)
    labels = {int(train[i]["label"]) for i in range(len(train))}
    assert labels == set(range(10))
    x = validation[0]["pixel_values"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() < x.max() <= 1
    assert torch.equal(x[0], x[2])
    gray = build_dataset(DataConfig(channels=1, resolution=8), "validation")
    assert gray[0]["pixel_values"].shape == (1, 8, 8) and len(gray) == round(0.05 * 1797)


def _table(count: int = 6):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "name": datasets.Value("string"),
            "y": datasets.ClassLabel(names=["a", "b", "c"]),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "img": [_noise((12 + i, 10), i) for i in range(count)],
            "name": [f"n{i}" for i in range(count)],
            "y": [i % 3 for i in range(count)],
        },
        features=features,
    )


def test_parquet_and_arrow_files_load_with_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    _table().to_parquet(str(tmp_path / "data.parquet"))
    config = {
        "source": str(tmp_path / "data.parquet"),
        "image_column": "img",
        "label_column": "y",
        "resolution": 8,
        "validation_size": 2,
    }
    items = _items(config)
    assert sorted(int(item["label"]) for item in items) == [0, 0, 1, 1, 2, 2]
    assert all(item["pixel_values"].shape == (3, 8, 8) for item in items)
    unlabeled = _items({**config, "label_column": None})
    assert {int(item["label"]) for item in unlabeled} == {-1}
    with pytest.raises(ValueError, match="label_column.*nope"):
        build_dataset({**config, "label_column": "nope"})
    with pytest.raises(ValueError, match="label_column.*integer"):
        build_dataset({**config, "label_column": "name"})


def test_save_to_disk_directory_loads(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    _table().save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"test": _table(4)}).save_to_disk(str(tmp_path / "dict"))
    config = {
        "source": str(tmp_path / "single"),
        "image_column": "img",
        "label_column": "y",
        "resolution": 8,
        "validation_size": 2,
    }
    assert sorted(int(item["label"]) for item in _items(config)) == [0, 0, 1, 1, 2, 2]
    arrow = next((tmp_path / "single").glob("*.arrow"))
    assert len(_items({**config, "source": str(arrow)})) == 6
    split = _items({**config, "source": str(tmp_path / "dict"), "split": "test"})
    assert sorted(int(item["label"]) for item in split) == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="split.*train"):
        build_dataset({**config, "source": str(tmp_path / "dict")})


def test_hub_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not be loaded.*local path"):
        build_dataset({"source": "someone/some-dataset"})


@pytest.mark.parametrize(
    "key, value",
    [
        ("resolution", 0),
        ("resolution", "32"),
        ("channels", 2),
        ("crop", "middle"),
        ("flip", "yes"),
        ("validation_size", 0),
        ("validation_size", 1.5),
        ("validation_size", -3),
        ("strict", 1),
        ("label_column", 3),
    ],
)
def test_bad_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{key} = {value!r}".replace("(", r"\(")):
        build_dataset({key: value})


def test_unknown_key_part_and_too_large_validation() -> None:
    with pytest.raises(ValueError, match=r"resolutoin.*allowed keys.*resolution"):
        build_dataset({"resolutoin": 32})
    with pytest.raises(ValueError, match="train.*validation"):
        build_dataset({}, "test")
    with pytest.raises(ValueError, match="validation_size = 1797 leaves no training images"):
        build_dataset({"validation_size": 1797})


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=r"no_such_folder.*source accepts.*folder"):
        build_dataset({"source": str(missing)})


def test_truncated_image_found_while_decoding_is_skipped(tmp_path: Path) -> None:
    data = _png_bytes(_noise((64, 64), 3), "JPEG")
    (tmp_path / "a_truncated.jpg").write_bytes(data[: len(data) // 2])  # passes verify()
    for name in ("b_white.png", "c_white.png"):
        Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / name)
    config = {"source": str(tmp_path), "resolution": 8, "validation_size": 1, "seed": 1}
    train = build_dataset(config, "train")  # seed 1 holds out c_white.png
    assert train.skipped == [] and len(train) == 2
    names = [Path(train.reader.name(j)).name for j in train.indices]
    assert "a_truncated.jpg" in names
    with pytest.warns(UserWarning, match="a_truncated.jpg"):
        items = [train[i] for i in range(2)]  # the truncated one falls back to the next image
    assert all(torch.all(item["pixel_values"] == 1.0) for item in items)
    assert [Path(p).name for p in train.skipped] == ["a_truncated.jpg"]
    strict = build_dataset({**config, "strict": True}, "train")
    with pytest.raises(ValueError, match=r"a_truncated\.jpg.*strict"):
        [strict[i] for i in range(2)]


def test_lmdb_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lmdb = pytest.importorskip("lmdb")
    path = tmp_path / "bedroom_lmdb"
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(5):
            txn.put(f"{i:040x}".encode(), _png_bytes(_noise((20, 14), i), "WEBP"))
    env.close()
    config = {"source": f"lsun:{path}", "resolution": 8, "validation_size": 1}
    train = build_dataset(config, "train")
    validation = build_dataset(config, "validation")
    assert len(train) == 4 and len(validation) == 1
    first = train[0]["pixel_values"]  # opens the environment in this process
    assert first.shape == (3, 8, 8) and first.std() > 0.1  # noise, not a blank image
    assert validation[0]["pixel_values"].shape == (3, 8, 8)  # both parts share the environment
    assert torch.equal(pickle.loads(pickle.dumps(train))[0]["pixel_values"], first)
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=2)  # reopens per worker
    batches = list(loader)
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 8, 8)] * 2
    assert all(int(label) == -1 for b in batches for label in b["label"])
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(ImportError, match="pip install lmdb"):
        build_dataset(config)


def test_tables_decode_through_with_transform_and_name_unreadable_rows(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    images = [_png_bytes(_noise((12, 10), i)) for i in range(4)]
    images[1] = b"not an image"
    table = datasets.Dataset.from_dict({"img": images, "y": [0, 1, 2, 3]})
    table.save_to_disk(str(tmp_path / "saved"))
    config = {
        "source": str(tmp_path / "saved"),
        "image_column": "img",
        "label_column": "y",
        "resolution": 8,
        "validation_size": 1,
        "seed": 3,
    }
    train = build_dataset(config, "train")
    assert train.reader.table.format["type"] == "custom"  # Dataset.with_transform
    row = train.reader.table[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    bad = int(np.flatnonzero(train.indices == 1)[0]) if 1 in train.indices else None
    with pytest.warns(UserWarning, match="row 1"):
        items = [train[i] for i in range(len(train))] + _items(config)
    assert all(item["pixel_values"].shape == (3, 8, 8) for item in items)
    assert train.skipped == [f"{tmp_path / 'saved'} row 1"] and bad is not None
    assert int(train[bad]["label"]) != 1  # replaced by the next readable row
    strict = build_dataset({**config, "strict": True}, "train")
    with pytest.raises(ValueError, match=r"unreadable image .*row 1.*strict"):
        [strict[i] for i in range(len(strict))]


def test_hub_dataset_config_name_and_cache_dir_reach_load_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return _table()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = {
        "source": "someone/imagenet",
        "dataset_config_name": "full",
        "cache_dir": str(tmp_path / "hf"),
        "split": "validation",
        "image_column": "img",
        "label_column": "y",
        "resolution": 8,
        "validation_size": 2,
    }
    assert len(build_dataset(config)) == 4
    expected = dict(
        name="full", split="validation", cache_dir=str(tmp_path / "hf"), streaming=False
    )
    assert calls == [("someone/imagenet", expected)]


def test_cache_dir_holds_the_arrow_conversion_of_a_parquet_file(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    _table().to_parquet(str(tmp_path / "data.parquet"))
    cache = tmp_path / "hf_cache"
    config = {
        "source": str(tmp_path / "data.parquet"),
        "cache_dir": str(cache),
        "image_column": "img",
        "label_column": "y",
        "resolution": 8,
        "validation_size": 2,
    }
    assert len(build_dataset(config)) == 4
    assert list(cache.rglob("*.arrow")), "the parquet file was converted into cache_dir"


@pytest.mark.parametrize(
    "source, change, key, fix",
    [
        ("digits", {"streaming": True, "validation_size": 10}, "streaming", "streaming: false"),
        ("digits", {"dataset_config_name": "x"}, "dataset_config_name", "remove it"),
        ("digits", {"cache_dir": "/tmp/x"}, "cache_dir", "remove it"),
        ("lsun:{tmp}", {"streaming": True, "validation_size": 1}, "streaming", "false"),
        ("{tmp}", {"streaming": True, "validation_size": 1}, "streaming", "image folder"),
        ("{tmp}", {"cache_dir": "/tmp/x"}, "cache_dir", "NEVERCOLLAPSE_DATA_CACHE"),
        ("{tmp}/data.parquet", {"dataset_config_name": "x"}, "dataset_config_name", "hub"),
        ("{tmp}/data.arrow", {"cache_dir": "/tmp/x"}, "cache_dir", "remove it"),
        ("someone/data", {"streaming": True}, "validation_size", "integer count"),
        ("someone/data", {"shuffle_buffer_size": 0}, "shuffle_buffer_size", ">= 1"),
        ("someone/data", {"dataset_config_name": ""}, "dataset_config_name", "non-empty"),
    ],
)
def test_keys_a_source_cannot_use_are_refused_naming_the_key(
    tmp_path: Path, source: str, change: dict, key: str, fix: str
) -> None:
    from engine.config import ConfigError
    from engine.data import check_source_exists

    (tmp_path / "data.parquet").write_bytes(b"")
    (tmp_path / "data.arrow").write_bytes(b"")
    config = {"source": source.format(tmp=tmp_path), **change}
    for check in (lambda: check_source_exists(DataConfig(**config)), lambda: build_dataset(config)):
        with pytest.raises(ConfigError, match=f"data.{key} = .*{fix}") as error:
            check()  # before anything is read
        assert "\n" not in str(error.value)
