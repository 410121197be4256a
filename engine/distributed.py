"""What the processes of a run agree on: one "any process" reduction, means of logged values,
decisions taken once and broadcast, folders every process must see, and the end-of-run check
that every process holds the same weights."""

from __future__ import annotations

import hashlib
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from .config import ConfigError

T = TypeVar("T")


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a collective: every process must
    call it; accelerate's ``reduce`` has max, not or)."""
    t = torch.tensor([float(flag)], device=accelerator.device)
    return accelerator.reduce(t, reduction="max").item() > 0


def mean_over_processes(accelerator: Accelerator, values: dict[str, float | torch.Tensor]) -> dict:
    """Each value (a number or a 0-d tensor) averaged over the processes: one collective and
    one read from the device."""
    keys = sorted(values)
    device, double = accelerator.device, torch.float64
    t = torch.stack([torch.as_tensor(values[k]).to(device, double).reshape(()) for k in keys])
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def main_process_decides(accelerator: Accelerator | None, decide: Callable[[], T]) -> T:
    """``decide()`` run by the main process alone, its result (or its exception) handed to every
    process. A decision that leads processes into collectives (a cache hit, a file that exists)
    must be the same on all of them: node-local folders may differ."""
    if accelerator is None or accelerator.num_processes == 1:
        return decide()
    outcome: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [decide(), None]
        except Exception as err:  # noqa: BLE001 - raised on every process below
            outcome = [None, err]
    broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def check_replicas_agree(accelerator: Accelerator, tensors: dict[str, torch.Tensor]) -> None:
    """Raise, naming them, if any process holds other weights or buffers (e.g. codebooks) than
    process 0: a SHA-256 of each tensor's bytes, gathered and compared exactly."""
    if accelerator.num_processes == 1:
        return
    names = sorted(tensors)
    digests = []
    for name in names:
        data = tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        digests.append(int.from_bytes(hashlib.sha256(data).digest()[:7], "big"))
    mine = torch.tensor(digests, dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine.unsqueeze(0))
    differ = [n for n, column in zip(names, every.T) if len(set(column.tolist())) > 1]
    if differ:
        raise RuntimeError(
            f"processes ended with different {differ[:5]} ({len(differ)} "
            "tensors); please report this with your config"
        )
    accelerator.print(f"weights identical on all {accelerator.num_processes} processes")


def check_shared_folder(accelerator: Accelerator, folder: str | Path, what: str) -> None:
    """Every process must see ``folder`` (``what``: the key that names it): the main process
    writes a file there and every process looks for it. Checked at the start, where a folder of
    one machine's local disk would otherwise make another machine hang or miss a shard later."""
    if accelerator.num_processes == 1:
        return
    folder = Path(folder)
    probe = [f".visible-{uuid.uuid4().hex}" if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / probe[0]).touch()
    broadcast_object_list(probe, from_process=0)
    seen = (folder / probe[0]).is_file()
    where = [f"process {accelerator.process_index} on {socket.gethostname()}"]
    blind = gather_object(where if not seen else [])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / probe[0]).unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"{what} {folder} is not shared by every process: {', '.join(blind)} cannot see "
            f"what process 0 ({socket.gethostname()}) wrote there; put it on storage that every "
            "machine mounts at the same path (see the README's Several machines)"
        )
