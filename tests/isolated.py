"""Fresh Python processes in which this project's packages cannot be imported, as on the machine
of someone who has diffusers but not nevercollapse: for checks that a saved folder loads by
itself. Optionally with a Hub served from a local folder (``FAKE_HUB``), so that diffusers'
download code decides which files of a repository arrive, without any network."""

import os
import subprocess
import sys

BLOCKED = ("tokenizer", "pipelines", "engine", "diffusion")

PRELUDE = f"""
import sys


class _NotInstalled:
    # first on sys.meta_path: importing these fails whatever sys.path and the editable install say
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed here")


sys.meta_path.insert(0, _NotInstalled())
"""

# Serves the files of folder REMOTE as Hub repository "someone/<anything>": diffusers' calls to the
# Hub (repository info, single files, snapshots with allow/ignore patterns) copy them into
# SNAPSHOT, as huggingface_hub's cache would hold them. Everything else stays offline.
FAKE_HUB = """
import shutil
import types
from pathlib import Path

import diffusers.pipelines.pipeline_utils as _pipeline_utils
import diffusers.utils.dynamic_modules_utils as _dynamic_modules
from huggingface_hub.utils import filter_repo_objects

REMOTE, SNAPSHOT = Path(REMOTE), Path(SNAPSHOT)
REPO_FILES = sorted(p.relative_to(REMOTE).as_posix() for p in REMOTE.rglob("*") if p.is_file())


def _fetch(name):
    (SNAPSHOT / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REMOTE / name, SNAPSHOT / name)
    return str(SNAPSHOT / name)


def hf_hub_download(repo_id, filename, *, subfolder=None, **kwargs):
    return _fetch(f"{subfolder}/{filename}" if subfolder else filename)


def snapshot_download(repo_id, *, allow_patterns=None, ignore_patterns=None, **kwargs):
    for name in filter_repo_objects(REPO_FILES, allow_patterns=allow_patterns,
                                    ignore_patterns=ignore_patterns):
        _fetch(name)
    return str(SNAPSHOT)


def model_info(repo_id, **kwargs):
    siblings = [types.SimpleNamespace(rfilename=name) for name in REPO_FILES]
    return types.SimpleNamespace(sha="0" * 40, siblings=siblings)


for _module in (_pipeline_utils, _dynamic_modules):
    for _fake in (hf_hub_download, snapshot_download, model_info):
        if hasattr(_module, _fake.__name__):
            setattr(_module, _fake.__name__, _fake)
"""


def start_without_project(script: str, workdir, **env) -> subprocess.Popen:
    """Starts ``script`` in a fresh process without this project's packages, in ``workdir``,
    with its own diffusers modules cache, offline. Read it with ``finish``."""
    workdir = os.fspath(workdir)
    env = {
        **os.environ,
        "HF_HOME": os.path.join(workdir, "hf-home"),
        "HF_MODULES_CACHE": os.path.join(workdir, "hf-modules"),
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + script],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    """The output of a process of ``start_without_project``, which must have succeeded."""
    output = process.communicate(timeout=timeout)[0]
    assert process.returncode == 0, f"the isolated process failed:\n{output[-6000:]}"
    return output


def run_without_project(script: str, workdir, timeout: int = 300, **env) -> str:
    return finish(start_without_project(script, workdir, **env), timeout)
