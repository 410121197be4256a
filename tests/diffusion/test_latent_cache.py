"""The stage-two latent cache: round trip, flips, reuse, stale refusal, resume, scaling factor and
a two-process build (tiny tokenizer, the embedded digits, CPU)."""

import json
import os
from pathlib import Path

import pytest
import torch

from diffusion.latent_cache import (
    CacheConfig,
    LatentCache,
    StaleCacheError,
    build_latent_cache,
    measure_scaling_factor,
    tokenizer_fingerprint,
)
from engine.data import build_dataset
from tests.launch import ROOT, launch_two_processes

DATA = {"source": "digits", "resolution": 16, "validation_size": 97}
SHARD = 256  # 1,700 train items → 7 shards, the last one partial


def settings(root, **options) -> CacheConfig:
    """The cache section of a build into ``root``."""
    return CacheConfig(dir=str(root), **options)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data():
    dataset = build_dataset(DATA)
    items = [dataset[i] for i in range(len(dataset))]
    return (
        torch.stack([item["pixel_values"] for item in items]),
        torch.stack([item["label"] for item in items]),
    )


@torch.no_grad()
def encode(tokenizer, images, quantized=True):
    """The reference: encode directly, in batches of 64 like the cache."""
    tokenizer.eval()
    out = []
    for x in images.split(64):
        h = tokenizer.encode(x).latents
        out.append(tokenizer.quantize(h).z_q if quantized else h)
    return torch.cat(out)


@pytest.fixture(scope="module")
def built(tokenizer, tmp_path_factory):
    """The default cache (quantized, no flips), built once for the module."""
    root = tmp_path_factory.mktemp("cache")
    return root, build_latent_cache(tokenizer, DATA, settings(root, shard_size=SHARD))


def count_encodes(monkeypatch, tokenizer, fail_after=None):
    """Record the batch sizes ``tokenizer.encode`` sees; raise KeyboardInterrupt (a simulated
    kill) once ``fail_after`` batches are done."""
    calls, encode = [], tokenizer.encode

    def wrapper(x, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt
        calls.append(len(x))
        return encode(x, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", wrapper)
    return calls


def test_round_trip_and_metadata(tokenizer, data, built):
    root, cache = built
    images, labels = data
    assert len(cache) == len(images) == 1700
    assert torch.equal(cache.load()[0], encode(tokenizer, images))
    assert torch.equal(cache.load()[1], labels)
    item = cache[5]
    assert item["latents"].dtype == torch.float32 and item["latents"].shape == (4, 8, 8)
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert torch.equal(item["latents"], cache.load()[0][5]) and item["label"] == labels[5]
    meta = json.loads((root / "metadata.json").read_text())
    assert meta == cache.metadata
    assert meta["complete"] is True and meta["format"] == 3
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert (
        meta["tokenizer_config"]["embed_dim"] == 4
        and "scaling_factor" not in meta["tokenizer_config"]
    )
    assert meta["data"]["resolution"] == 16 and meta["data"]["validation_size"] == 97
    assert (meta["part"], meta["quantized"], meta["flips"]) == ("train", True, False)
    assert (meta["latent_shape"], meta["count"], meta["shard_size"]) == ([4, 8, 8], 1700, SHARD)
    assert meta["shards"] == [f"shard-{k:05d}.safetensors" for k in range(7)]
    assert (meta["dtype"], meta["has_labels"], meta["num_classes"]) == ("float32", True, 10)
    assert sorted(p.name for p in root.iterdir()) == sorted(meta["shards"] + ["metadata.json"])


def test_unquantized_latents(tokenizer, data, tmp_path):
    images, labels = data
    cache = build_latent_cache(
        tokenizer, DATA, settings(tmp_path, quantized=False, shard_size=SHARD)
    )
    assert cache.metadata["quantized"] is False
    reference = encode(tokenizer, images, quantized=False)
    assert torch.equal(cache.load()[0], reference)
    assert not torch.equal(reference, encode(tokenizer, images))  # z_q really differs
    assert torch.equal(cache.load()[1], labels)


def test_flips_interleave_mirrored_images_from_one_decode(
    tokenizer, data, built, tmp_path, monkeypatch
):
    images, labels = data
    calls = count_encodes(monkeypatch, tokenizer)
    cache = build_latent_cache(tokenizer, DATA, settings(tmp_path, flips=True, shard_size=SHARD))
    n = len(images)
    assert sum(calls) == 2 * n and calls[0] == 2 * 64  # 64 images and their mirror images
    assert len(cache) == cache.metadata["count"] == 2 * n
    assert cache.metadata["dataset_size"] == n and len(cache.metadata["shards"]) == 14
    latents, cached_labels = cache.load()
    torch.testing.assert_close(latents[0::2], built[1].load()[0], rtol=1e-5, atol=1e-6)
    mirrored = encode(tokenizer, images.flip(-1))
    torch.testing.assert_close(latents[1::2], mirrored, rtol=1e-5, atol=1e-6)
    assert not torch.equal(mirrored, built[1].load()[0])
    assert torch.equal(cached_labels, labels.repeat_interleave(2))
    with pytest.raises(ValueError, match="shard_size must be even"):
        build_latent_cache(tokenizer, DATA, settings(tmp_path / "odd", flips=True, shard_size=255))


def test_complete_cache_is_reused_without_encoding(tokenizer, built, monkeypatch):
    root, cache = built
    stamps = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    calls = count_encodes(monkeypatch, tokenizer)
    again = build_latent_cache(tokenizer, DATA, settings(root, shard_size=SHARD, batch_size=7))
    assert calls == []
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamps
    assert torch.equal(again.load()[0], cache.load()[0]) and again.metadata == cache.metadata


def test_random_augmentations_are_replaced_by_fixed_views(tokenizer, built, monkeypatch):
    root, cache = built
    calls = count_encodes(monkeypatch, tokenizer)
    with pytest.warns(UserWarning, match="pass flips=True"):
        again = build_latent_cache(tokenizer, {**DATA, "flip": True, "crop": "random"}, root)
    assert calls == [] and torch.equal(again.load()[0], cache.load()[0])  # the same fixed views
    assert (cache.metadata["data"]["flip"], cache.metadata["data"]["crop"]) == (False, "center")


@pytest.mark.parametrize(
    "change, message",
    [
        ("weights", "tokenizer weights differ"),
        ("config", "tokenizer.quantizer_options {'num_codes': 16} vs {'num_codes': 32}"),
        ("resolution", "data.resolution 16 vs 32"),
        ("quantized", "quantized True vs False"),
        ("part", "part 'train' vs 'validation'"),
    ],
)
def test_stale_cache_is_refused(built, change, message, tiny_tokenizer):
    root, _ = built
    tokenizer, data, options, part = tiny_tokenizer(), dict(DATA), {}, "train"
    if change == "weights":
        with torch.no_grad():
            tokenizer.encoder.conv_in.bias.add_(0.01)
    elif change == "config":
        tokenizer = tiny_tokenizer(quantizer_options={"num_codes": 32})
    elif change == "resolution":
        data["resolution"] = 32
    elif change == "quantized":
        options["quantized"] = False
    else:
        part = "validation"
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(StaleCacheError) as error:
        build_latent_cache(tokenizer, data, settings(root, shard_size=SHARD, **options), part=part)
    text = str(error.value)
    assert message in text and f"delete {root} or choose another cache dir" in text
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


def test_resume_after_kill_encodes_only_missing_shards(tokenizer, built, monkeypatch, tmp_path):
    count_encodes(monkeypatch, tokenizer, fail_after=10)
    with pytest.raises(KeyboardInterrupt):  # killed in shard 2, after 10 batches of 64
        build_latent_cache(tokenizer, DATA, settings(tmp_path, shard_size=SHARD))
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["pending.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(FileNotFoundError, match="not a complete latent cache"):
        LatentCache(tmp_path)
    with pytest.raises(StaleCacheError, match="flips False vs True"):  # partial caches too
        build_latent_cache(tokenizer, DATA, settings(tmp_path, shard_size=SHARD, flips=True))

    (tmp_path / "shard-00000.safetensors").unlink()
    (tmp_path / "shard-00003.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    (tmp_path / "shard-00005.safetensors").write_bytes(b"not a safetensors file")
    kept = (tmp_path / "shard-00001.safetensors").stat().st_mtime_ns
    calls = count_encodes(monkeypatch, tokenizer)
    with pytest.warns(UserWarning, match="re-encoding unreadable shard .*shard-00005"):
        cache = build_latent_cache(tokenizer, DATA, settings(tmp_path, shard_size=SHARD))
    assert sum(calls) == 1700 - SHARD  # everything but shard 1
    assert (tmp_path / "shard-00001.safetensors").stat().st_mtime_ns == kept
    assert torch.equal(cache.load()[0], built[1].load()[0])
    assert torch.equal(cache.load()[1], built[1].load()[1])
    assert cache.metadata == built[1].metadata
    assert not any(p.name.endswith(".tmp") or p.name == "pending.json" for p in tmp_path.iterdir())


def test_measure_scaling_factor(tokenizer, data, built):
    # merged from the 7 shards' moments, computed while they were written
    reference = encode(tokenizer, data[0]).double()
    assert measure_scaling_factor(built[1]) == pytest.approx(1 / reference.std().item(), rel=1e-12)
    assert built[1].metadata["latent_mean"] == pytest.approx(reference.mean().item(), abs=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_storage(tokenizer, built, tmp_path, dtype):
    cache = build_latent_cache(tokenizer, DATA, settings(tmp_path, shard_size=SHARD, dtype=dtype))
    latents, labels = cache.load()
    full = built[1].load()[0]
    assert latents.dtype == torch.float32 and torch.equal(labels, built[1].load()[1])
    assert torch.equal(latents, full.to(getattr(torch, dtype)).float())
    assert sum(p.stat().st_size for p in tmp_path.glob("shard-*")) < 0.55 * sum(
        p.stat().st_size for p in built[0].glob("shard-*")
    )
    with pytest.raises(StaleCacheError, match=f"dtype '{dtype}' vs 'float32'"):
        build_latent_cache(tokenizer, DATA, settings(tmp_path, shard_size=SHARD))


def test_cache_of_an_older_format_is_refused_with_the_rebuild_command(
    built, tmp_path, tiny_tokenizer
):
    import shutil

    root = tmp_path / "old"
    shutil.copytree(built[0], root)
    meta = json.loads((root / "metadata.json").read_text())
    for old in (1, 2):  # 2: an unreadable image's slot filled with the next image
        (root / "metadata.json").write_text(json.dumps({**meta, "format": old}))
        with pytest.raises(StaleCacheError, match=f"format {old}.*rm -r {root}.*train_diffusion"):
            LatentCache(root)
        with pytest.raises(StaleCacheError, match=f"format {old} vs 3"):
            build_latent_cache(tiny_tokenizer(), DATA, settings(root, shard_size=SHARD))


def test_items_and_batches_read_the_mapped_shards(built):
    import pickle

    _, cache = built
    latents, labels = cache.load()
    index = [1699, 0, 300, 5, 256, 255]  # across shards, in any order
    batch = [cache[i] for i in index]
    assert all(torch.equal(item["latents"], latents[i]) for item, i in zip(batch, index))
    assert [int(item["label"]) for item in batch] == labels[index].tolist()
    again = pickle.loads(pickle.dumps(cache))  # a loader worker maps the files again
    assert again._maps is None and torch.equal(again[300]["latents"], latents[300])
    item = again[-1]
    item["latents"].zero_()  # copy-on-write: the file and other readers keep their values
    assert torch.equal(cache[1699]["latents"], latents[1699]) and latents[1699].abs().sum() > 0
    loader = torch.utils.data.DataLoader(cache, batch_size=100, num_workers=2)
    assert torch.equal(torch.cat([b["latents"] for b in loader]), latents)
    with pytest.raises(IndexError):
        cache[1700]


def test_fingerprint_covers_config_and_weights_but_not_scaling_factor(tiny_tokenizer):
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.register_to_config(scaling_factor=0.25)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    with torch.no_grad():
        b.decoder.conv_out.weight[0, 0, 0, 0] += 1e-3
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(tiny_tokenizer(quantizer="vq"))


def test_opening_a_folder_that_is_no_cache_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        LatentCache(tmp_path)
    assert str(tmp_path) in str(error.value) and "build_latent_cache" in str(error.value)


@pytest.mark.slow
def test_two_process_build_matches_single_process(built, tmp_path):
    root, reports = tmp_path / "cache", tmp_path / "reports"
    reports.mkdir()
    launch_two_processes(
        ROOT / "tests" / "workers" / "latent_cache_worker.py", str(root), str(reports), port=29541
    )
    ranks = [json.loads((reports / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["cache_length"] for r in ranks] == [1700, 1700]
    assert [r["encoded"] for r in ranks] == [3 * SHARD + 1700 - 6 * SHARD, 3 * SHARD]
    cache = LatentCache(root)
    assert cache.metadata == built[1].metadata
    assert torch.equal(cache.load()[0], built[1].load()[0])
    assert torch.equal(cache.load()[1], built[1].load()[1])
    assert sorted(os.listdir(root)) == sorted(os.listdir(built[0]))


def bomb_png() -> bytes:
    """A PNG whose header says 20,000 × 20,000 pixels (PIL refuses it as a decompression bomb
    on opening), without the data."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC
    return bytes(data)


def bad_folder(root):
    """18 distinct readable images and one of each kind of unreadable file."""
    import io

    import numpy as np
    from PIL import Image

    root.mkdir()
    for i in range(18):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"good{i:02d}.png")
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(buffer, "JPEG")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
    (root / "text.png").write_text("not an image")
    (root / "huge.png").write_bytes(bomb_png())
    return root


@pytest.mark.parametrize("flips", [False, True])
def test_unreadable_images_are_left_out_never_replaced(tmp_path, tiny_tokenizer, flips):
    data = {"source": str(bad_folder(tmp_path / "images")), "resolution": 16, "validation_size": 3}
    tokenizer, per_image = tiny_tokenizer(), 2 if flips else 1
    caches = [
        build_latent_cache(
            tokenizer, data, settings(tmp_path / part, shard_size=4, flips=flips), part=part
        )
        for part in ("train", "validation")
    ]
    listed = sum(c.metadata["dataset_size"] for c in caches)
    assert listed == 22  # every file listed, 4 unreadable
    assert sum(c.metadata["unreadable"] for c in caches) == 4
    names = sorted(Path(n).name for c in caches for n in c.metadata["unreadable_examples"])
    assert names == ["empty.png", "huge.png", "text.png", "truncated.jpg"]
    rows = torch.cat([c.load()[0] for c in caches])
    assert len(rows) == sum(len(c) for c in caches) == 18 * per_image  # readable ones only
    originals = rows[::per_image].flatten(1)
    assert len(torch.unique(originals, dim=0)) == 18, "a latent appears twice"
    for cache in caches:  # each item is the image it says it is: encoded again directly
        dataset = build_dataset({**data, "flip": False}, cache.metadata["part"])
        good = [
            item for i in range(len(dataset)) if "unreadable" not in (item := dataset.readable(i))
        ]
        expected = encode(tokenizer, torch.stack([item["pixel_values"] for item in good]))
        assert torch.equal(cache.load()[0][::per_image], expected)
