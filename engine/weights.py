"""Pretrained weights (VGG16 for LPIPS, Inception for FID): taken from the torch hub cache,
downloaded into it on a connected machine, or refused with a message saying which file to put
where. Set NEVERCOLLAPSE_NO_DOWNLOAD=1 to never download (the tests do). Also the exported
weights a run starts from (``train.init_from``)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch

NO_DOWNLOAD = "NEVERCOLLAPSE_NO_DOWNLOAD"


def cached_weights(url: str, needed_by: str, alternative: str) -> Path:
    """The file behind ``url`` in ``$TORCH_HOME/hub/checkpoints``, downloading it if allowed.
    ``alternative`` ends the error message (what to do instead)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    reason = f"downloads are disabled ({NO_DOWNLOAD}=1)"
    if not os.environ.get(NO_DOWNLOAD):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)  # atomic rename
            return path
        except Exception as e:  # noqa: BLE001 - offline, proxy, disk: all mean "not here"
            reason = f"it could not be downloaded ({type(e).__name__}: {e})"
    raise FileNotFoundError(
        f"{needed_by} needs the weights file {path.name!r} in the directory {str(path.parent)!r} "
        f"and {reason}. On a connected machine download {url} and copy it to {str(path)!r}, "
        f"{alternative}."
    )


WEIGHTS = "diffusion_pytorch_model.safetensors"


def init_from(model: torch.nn.Module, path: str | Path, subfolders: tuple[str, ...]) -> Path:
    """Load the weights of an exported diffusers model into ``model`` (fine-tuning): ``path``
    itself or the first of its ``subfolders`` that holds ``diffusion_pytorch_model.safetensors``.
    Every tensor must match by name and shape; a ``ConfigError`` names the first that does
    not. Returns the folder read."""
    from safetensors.torch import load_file

    from .config import ConfigError

    path = Path(path).expanduser()
    folders = [path / sub for sub in ("", *subfolders)]
    found = next((f for f in folders if (f / WEIGHTS).is_file()), None)
    if found is None:
        raise ConfigError(
            f"train.init_from={path}: no {WEIGHTS} in {', '.join(map(str, folders))}; "
            "pass an exported model folder (or the run / pipeline folder around it)"
        )
    weights, own = load_file(found / WEIGHTS), model.state_dict()
    for name, tensor in own.items():
        if name not in weights or weights[name].shape != tensor.shape:
            given = tuple(weights[name].shape) if name in weights else "absent"
            raise ConfigError(
                f"train.init_from={found}: {name} is {given} there but {tuple(tensor.shape)} "
                "in the model this config builds; make the model section match the exported "
                "model's config.json"
            )
    extra = sorted(set(weights) - set(own))
    if extra:
        raise ConfigError(
            f"train.init_from={found}: {extra[0]} (and {len(extra) - 1} more) are not in the "
            "model this config builds; make the model section match the exported model"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
    return found
