"""What makes a training step wait: reads of device values on the host (``.item()``, ``bool()``,
``.tolist()``, ...: the host waits for the device to finish everything queued) and collectives
(every process waits for the others). :class:`CountWaits` counts both while it is active, each
under the place in this project that caused it (``engine/run.py:_agree``), so a benchmark or a
test can say how many a step makes and where they come from.

Counted: every ``aten._local_scalar_dense`` (what ``item``/``bool``/``int``/``float`` run),
``Tensor.tolist`` and ``Tensor.numpy``, and calls of ``torch.distributed``'s collectives
(DDP's buffer broadcasts included; its gradient all-reduce runs in C++ and is not counted).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "barrier",
    "_broadcast_coalesced",
)
_THIS = Path(__file__)
_ROOT = _THIS.resolve().parents[1]
_PLUMBING = ("torch/_dynamo", "torch/_compile.py", "torch/utils/_python_dispatch", "torch/_ops.py")
_PACKAGES = ("engine", "tokenizer", "diffusion", "pipelines", "scripts")


def _caller() -> str | None:
    """Where a wait comes from: ``path:function`` of the innermost frame of this project's code,
    and, when that called into a library, `` → `` the library's innermost frame
    (``torch/optim/adam.py:_single_tensor_adam``). None inside a DataLoader's fetch: loading
    runs in worker processes in real runs, on host tensors."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append((Path(frame.f_code.co_filename), frame.f_code.co_name))
        frame = frame.f_back
    if any("torch/utils/data" in path.as_posix() for path, _ in frames):
        return None
    inner = None
    for path, function in frames:
        if path == _THIS or any(part in path.as_posix() for part in _PLUMBING):
            continue
        place = f"{_short(path)}:{function}"
        if path.is_relative_to(_ROOT) and path.relative_to(_ROOT).parts[0] in _PACKAGES:
            return place if inner is None else f"{place} → {inner}"
        inner = inner or place
    return inner or "elsewhere"


def _short(path: Path) -> str:
    """A path relative to the project or to its site-packages folder."""
    for root in (_ROOT, *(p for p in map(Path, sys.path) if p.name == "site-packages")):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


class CountWaits(TorchDispatchMode):
    """``with CountWaits() as waits: ...``; then ``waits.reads`` and ``waits.collectives`` are
    Counters of caller → count (:meth:`take` returns them and starts again)."""

    def __init__(self):
        super().__init__()
        self.reads: collections.Counter = collections.Counter()
        self.collectives: collections.Counter = collections.Counter()
        self._patched: list[tuple[object, str, object]] = []

    def take(self) -> tuple[collections.Counter, collections.Counter]:
        taken = self.reads, self.collectives
        self.reads, self.collectives = collections.Counter(), collections.Counter()
        return taken

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._count("reads")
        return func(*args, **(kwargs or {}))

    def _count(self, kind: str) -> None:
        place = _caller()
        if place is not None:
            getattr(self, kind)[place] += 1

    def _wrap(self, owner, name: str, kind: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            self._count(kind)
            return original(*args, **kwargs)

        self._patched.append((owner, name, original if name in vars(owner) else None))
        setattr(owner, name, counted)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            self._wrap(torch.Tensor, name, "reads")
        for name in COLLECTIVES:
            self._wrap(dist, name, "collectives")
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._patched):
            if original is None:  # it was inherited
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._patched.clear()
        return super().__exit__(*exc)
