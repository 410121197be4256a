"""Pretrained weights (VGG16 for LPIPS, Inception for FID): taken from the torch hub cache,
downloaded into it on a connected machine, or refused with a message saying which file to put
where. Set NEVERCOLLAPSE_NO_DOWNLOAD=1 to never download (the tests do)."""

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
