"""Publishing a saved pipeline folder on the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi

from .model_card import set_repo_id

# Never uploaded, wherever they sit in the folder (huggingface_hub matches these with fnmatch
# against paths relative to the folder; "*" also matches "/"): training checkpoints and their
# half-written ".partial" copies, the latent cache, logs, byte code.
IGNORE_PATTERNS = [
    "checkpoint-*",
    "*/checkpoint-*",
    "checkpoints/*",
    "*/checkpoints/*",
    "*.partial",
    "*.partial/*",
    "latents/*",
    "*/latents/*",
    "logs/*",
    "*/logs/*",
    "*.log",
    "*events.out.tfevents.*",
    "__pycache__/*",
    "*/__pycache__/*",
    "*.pyc",
]


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str = "Upload latent diffusion pipeline",
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload the pipeline folder ``folder`` (``save_pretrained``'s or ``train_diffusion.py``'s
    ``DIR/pipeline``) to the model repository ``repo_id``, created if needed, and return the
    repository's URL.

    Only a pipeline folder (one with model_index.json) is accepted, not the run folder around it,
    and ``IGNORE_PATTERNS`` keep checkpoints, latents, partial writes and logs out even if they
    are inside. The folder's model card is first pointed at ``repo_id`` (written from
    training_config.yaml if the folder has none), so its loading snippet works for whoever
    reads it on the Hub."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        inner = folder / "pipeline"
        hint = f"; did you mean {inner}?" if (inner / "model_index.json").is_file() else ""
        raise ValueError(
            f"{folder} is not a saved pipeline folder (no model_index.json): push the folder "
            f"written by save_pretrained / train_diffusion.py (DIR/pipeline){hint}"
        )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        set_repo_id(folder, url.repo_id)
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as e:  # noqa: BLE001 - network, login, quota: all end the same way
        raise HubPushError(
            f"could not push {folder} to {repo_id} ({type(e).__name__}: {e}); the folder is "
            f"intact, retry with: python scripts/push_to_hub.py --pipeline {folder} "
            f"--hub_model_id {repo_id}"
        ) from e
    return str(url)


class HubPushError(RuntimeError):
    """A push that failed (network, login, quota); the message says how to retry."""
