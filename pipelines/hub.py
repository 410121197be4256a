"""Publishing a saved pipeline folder on the Hugging Face Hub."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path, PurePosixPath

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import filter_repo_objects

from .common import MODEL_CARD, TRAINING_CONFIG
from .model_card import set_repo_id

# What is uploaded (huggingface_hub's allow_patterns, matched against paths relative to the
# folder): these files at the top, the code files at the top (the pipeline's module and
# common.py), and, in the folder of each component that model_index.json lists, its config,
# weights (one file, or shards and their index) and code (vqvae/model.py). Only files at the top
# or in a sub-folder are considered: nothing deeper, which no component saves.
TOP_FILES = ["model_index.json", MODEL_CARD, TRAINING_CONFIG]
COMPONENT_FILES = ["*.json", "*.safetensors", "*.bin", "*.py"]
# Uploaded with local paths taken out (the folder keeps them: sample.py and eval_fid.py read
# data.source from training_config.yaml).
TEXT_SUFFIXES = (".json", ".yaml", ".md")
# A path on this machine: "/…" or "~/…" (also after "lsun:"), up to a blank or quote; not a URL's
# "//", nor the "/" of a relative path ("a/b", "./a", ".../a") or of "precision / recall".
_LOCAL_PATH = re.compile(r"(?<![\w/.~-])~?/[^\s/\"'`|,)\]}][^\s\"'`|,)\]}]*")
HUB_TOKEN_WARNING = (
    "--hub_token puts the token on the command line, which the launcher echoes when a run fails "
    "(and which others see in ps): set the HF_TOKEN environment variable or run "
    "`hf auth login` instead"
)


def upload_files(folder: str | os.PathLike) -> list[str]:
    """The files of the pipeline folder ``folder`` that ``push_to_hub`` uploads (paths relative
    to it, sorted): an allow-list built from its model_index.json (see ``TOP_FILES``,
    ``COMPONENT_FILES``), so checkpoints, latents, logs, partial writes and anything else that
    happens to be in the folder stay home."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    components = [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
    ]
    allow = TOP_FILES + [path.name for path in folder.glob("*.py")]
    allow += [f"{name}/{pattern}" for name in components for pattern in COMPONENT_FILES]
    found = [p for p in (*folder.glob("*"), *folder.glob("*/*")) if p.is_file()]
    names = sorted(p.relative_to(folder).as_posix() for p in found)
    return list(filter_repo_objects(names, allow_patterns=allow))


def without_local_paths(text: str) -> str:
    """``text`` with every absolute path on this machine replaced by ``.../<its last part>``
    (``/data/ffhq`` → ``.../ffhq``, as the card names a local dataset; a source read back from
    it is then a local path that does not exist, not a Hub dataset)."""
    return _LOCAL_PATH.sub(lambda m: f".../{PurePosixPath(m[0]).name}", text)


def public_content(path: Path) -> Path | bytes:
    """What is uploaded of the file ``path``: the file itself, or for a config, card or training
    config its text without local paths (and a JSON config without ``_name_or_path``: where
    diffusers loaded the component from, a path on this machine)."""
    if path.suffix not in TEXT_SUFFIXES:
        return path
    text = path.read_text()
    if path.suffix == ".json":
        config = json.loads(text)
        if isinstance(config, dict) and "_name_or_path" in config:
            del config["_name_or_path"]
            text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return without_local_paths(text).encode()


def warn_hub_token(token: str | None) -> None:
    """Warn that a token given as ``--hub_token`` is on the command line (``HUB_TOKEN_WARNING``)."""
    if token:
        warnings.warn(HUB_TOKEN_WARNING, stacklevel=2)


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
    ``DIR/pipeline``) to the model repository ``repo_id``, created if needed, in one commit, and
    return the repository's URL.

    Only a pipeline folder (one with model_index.json) is accepted, not the run folder around it,
    and only its ``upload_files`` go up, as ``public_content``: no path of this machine in any
    config, card or training config. The folder's model card is first pointed at ``repo_id``
    (written from training_config.yaml if the folder has none), so its loading snippet works for
    whoever reads it on the Hub."""
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
        set_repo_id(folder, url.repo_id)  # writes the card if there is none: listed after
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=public_content(folder / name))
            for name in upload_files(folder)
        ]
        api.create_commit(
            repo_id=url.repo_id,
            operations=operations,
            repo_type="model",
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
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
