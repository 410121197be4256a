"""Manifests: an image folder or an LSUN LMDB listed once into a memory-mapped Arrow file that
every process, every loader worker and both training stages share.

A scan lists names only (``os.scandir``; no image is opened: an unreadable file is found, named
and skipped when it is read). The manifest is kept in ``$NEVERCOLLAPSE_DATA_CACHE`` (default
``~/.cache/nevercollapse/data``) under a name made of the source's real path, and used again
as long as the source is unchanged: the modification times of every listed folder (a file added,
removed or renamed changes its folder's) or of the LMDB's files. Otherwise it is rebuilt, with a
message. Opening one maps the file: the operating system shares its pages between processes, so
paths and labels cost a process nothing that grows with the data.

An image folder is read as ``datasets.load_dataset("imagefolder", data_dir=root)`` reads it:

- *splits*: a folder whose name is a split keyword, alone or set off by ``-._ `` or a digit
  (``train``/``training``; ``validation``/``valid``/``dev``/``val``;
  ``test``/``testing``/``eval``/``evaluation``: ``train``, ``imagenet-val``, ``test_2``),
  holds that split; files outside every split folder are then left out. With no split folder,
  every image is in "train".
- *labels*: the name of each image's parent folder, numbered in sorted order over all splits;
  only when there are at least two such names and every image lies at the same depth (else
  every label is -1).
- names starting with "." and folders starting with "__" are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError

FORMAT = 1
CACHE_ENV = "NEVERCOLLAPSE_DATA_CACHE"
IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
)
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEPARATORS = r"[-._ 0-9]"
_SPLIT_NAMES = [
    (split, re.compile(rf"(?:.*{_SEPARATORS})?{word}(?:{_SEPARATORS}.*)?"))
    for split, words in SPLIT_KEYWORDS.items()
    for word in words
]
_BATCH = 100_000  # rows per Arrow record batch while writing


def default_cache_dir() -> Path:
    """``$NEVERCOLLAPSE_DATA_CACHE``, else ``$XDG_CACHE_HOME/nevercollapse/data`` (~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nevercollapse" / "data"


def split_of(relative_path: str) -> str | None:
    """The split named by the first folder of ``relative_path`` that names one, else None."""
    for part in relative_path.split("/")[:-1]:
        for split, pattern in _SPLIT_NAMES:
            if pattern.fullmatch(part):
                return split
    return None


class Manifest:
    """An open manifest: ``rows(split)`` is that split's zero-copy slice of the table (columns
    ``name``: a path relative to the root, or an LMDB key; ``label``: int32)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.path = path
        self.table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        self.meta: dict[str, Any] = json.loads(self.table.schema.metadata[b"nevercollapse"])

    def __reduce__(self):  # a loader worker maps the file again rather than copying the table
        return Manifest, (self.path,)

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def rows(self, split: str):
        if split not in self.meta["splits"]:
            raise ConfigError(
                f"data config split={split!r} is not in {self.meta['source']}; its "
                f"splits are {self.splits}"
            )
        start, stop = self.meta["splits"][split]
        return self.table.slice(start, stop - start)


def _manifest_path(source: str, cache_dir: Path) -> Path:
    name = re.sub(r"[^A-Za-z0-9]+", "-", Path(source).name).strip("-")[:40] or "data"
    return cache_dir / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.arrow"


def _fresh(meta: dict[str, Any], kind: str, stamps: dict[str, int] | None) -> str | None:
    """Why a manifest's ``meta`` is out of date, or None when it is current."""
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        return "it was written by another version"
    if stamps is None:  # a folder: every listed folder keeps its modification time
        for relative, mtime in meta["stamps"].items():
            try:
                if os.stat(os.path.join(meta["source"], relative)).st_mtime_ns != mtime:
                    return f"{os.path.join(meta['source'], relative)} changed"
            except OSError:
                return f"{os.path.join(meta['source'], relative)} is gone"
        return None
    return None if meta["stamps"] == stamps else "its files changed"


def _write(path: Path, batches, meta: dict[str, Any]) -> None:
    """Write record batches of (name, label) and ``meta`` as an Arrow IPC file, atomically."""
    import pyarrow as pa

    schema = pa.schema(
        [("name", pa.string() if meta["kind"] == "folder" else pa.binary()), ("label", pa.int32())],
        metadata={"nevercollapse": json.dumps(meta)},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex}")  # unique across nodes
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for names, labels in batches:
            writer.write_batch(
                pa.record_batch(
                    [pa.array(names, schema.field("name").type), pa.array(labels, pa.int32())],
                    schema=schema,
                )
            )
    os.replace(partial, path)  # a killed scan never leaves a half manifest under the real name


def _batched(names: list, labels: np.ndarray):
    for start in range(0, len(names), _BATCH):
        yield names[start : start + _BATCH], labels[start : start + _BATCH]


def _list_folder(root: str) -> tuple[list[str], dict[str, int]]:
    """Image paths under ``root`` relative to it ("/"-separated, sorted) and the modification
    time of every folder listed."""
    files, stamps, stack = [], {}, [""]
    while stack:
        relative = stack.pop()
        folder = os.path.join(root, relative)
        stamps[relative] = os.stat(folder).st_mtime_ns
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir():
                    if not entry.name.startswith("__"):
                        stack.append(name)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(name)
    files.sort()
    return files, stamps


def _scan_folder(root: str, path: Path) -> None:
    files, stamps = _list_folder(root)
    splits = [split_of(f) for f in files]
    if any(s is not None for s in splits):  # split folders: files outside them are left out
        kept = [(s, f) for s, f in zip(splits, files) if s is not None]
    else:
        kept = [("train", f) for f in files]
    order = list(SPLIT_KEYWORDS)
    kept.sort(key=lambda item: (order.index(item[0]), item[1]))
    parents = [os.path.basename(os.path.dirname(f)) for _, f in kept]
    classes = sorted(set(parents))
    if len(classes) > 1 and len({f.count("/") for _, f in kept}) == 1:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[p] for p in parents], dtype=np.int32)
    else:
        classes, labels = [], np.full(len(kept), -1, dtype=np.int32)
    ranges, start = {}, 0
    for split in order:
        count = sum(1 for s, _ in kept if s == split)
        if count:
            ranges[split] = [start, start + count]
            start += count
    meta = {
        "format": FORMAT,
        "kind": "folder",
        "source": root,
        "splits": ranges,
        "classes": classes,
        "stamps": stamps,
    }
    _write(path, _batched([f for _, f in kept], labels), meta)


def _lmdb_stamps(root: str) -> dict[str, int]:
    data = os.path.join(root, "data.mdb") if os.path.isdir(root) else root
    return {"mtime_ns": os.stat(data).st_mtime_ns, "size": os.stat(data).st_size}


def _scan_lmdb(root: str, path: Path, env: Any) -> None:
    def batches():
        with env.begin() as txn:
            names = []
            for key in txn.cursor().iternext(keys=True, values=False):
                names.append(bytes(key))
                if len(names) == _BATCH:
                    yield names, np.full(len(names), -1, dtype=np.int32)
                    names = []
            yield names, np.full(len(names), -1, dtype=np.int32)

    count = env.stat()["entries"]
    meta = {
        "format": FORMAT,
        "kind": "lmdb",
        "source": root,
        "splits": {"train": [0, count]},
        "classes": [],
        "stamps": _lmdb_stamps(root),
    }
    _write(path, batches(), meta)


def open_manifest(
    source: str, kind: str, cache_dir: str | os.PathLike | None = None, lmdb_env: Any = None
) -> Manifest:
    """The manifest of the folder (``kind="folder"``) or LMDB (``"lmdb"``, with its open
    environment) at ``source``: the current one from the cache, else scanned now (and
    written there for every later reader). Call it from one process first (accelerate's
    ``main_process_first``) so that a run scans once."""
    source = os.path.realpath(source)
    path = _manifest_path(source, Path(cache_dir or default_cache_dir()))
    stamps = _lmdb_stamps(source) if kind == "lmdb" else None
    reason = "there is none yet"
    if path.is_file():
        try:
            manifest = Manifest(path)
            reason = _fresh(manifest.meta, kind, stamps)
        except Exception as err:  # noqa: BLE001 - an unreadable manifest is rebuilt
            reason = f"it is unreadable ({err})"
        if reason is None:
            return manifest
    print(f"data: listing {source} into {path} ({reason})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if kind == "lmdb":
        _scan_lmdb(source, path, lmdb_env)
    else:
        _scan_folder(source, path)
    manifest = Manifest(path)
    print(
        f"data: {len(manifest.table):,} images listed in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return manifest
