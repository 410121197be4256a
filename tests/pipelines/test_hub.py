"""pipelines.hub.push_to_hub, offline: what it asks the Hub API for (HfApi's methods replaced),
which files huggingface_hub's own filter then uploads, and the card it points at the repo."""

import runpy
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects

from pipelines.export import describe_export
from pipelines.hub import push_to_hub

# what a run folder holds besides the pipeline; none of it may be uploaded, even from inside it
JUNK = [
    "checkpoint-3/model.safetensors",
    "checkpoint-4.partial/model.safetensors",
    "checkpoints/step_00000002/model.safetensors",
    "latents/shard-00000.safetensors",
    "latents/shard-00001.safetensors.partial",
    "logs/diffusion/events.out.tfevents.1700000000.host",
    "train.log",
    "unet/diffusion_pytorch_model.safetensors.partial",
    "vqvae/checkpoint-9/x.bin",
    "__pycache__/common.cpython-311.pyc",
]


@pytest.fixture
def hub(monkeypatch):
    """HfApi's create_repo and upload_folder, recorded instead of called."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, self.token, kwargs))
        full = repo_id if "/" in repo_id else f"someone/{repo_id}"  # the Hub adds the user
        return RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_the_pipeline_folder_and_nothing_of_the_run(tmp_path, save_pipeline, hub):
    folder = save_pipeline(tmp_path / "run" / "pipeline")
    describe_export(folder, {"data": {"source": "digits"}}, tmp_path / "none", False)
    pipeline_files = files(folder)
    for name in JUNK:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("not for the Hub")

    url = push_to_hub(folder, "someone/tiny", private=True, token="secret", commit_message="v1")

    assert url == "https://huggingface.co/someone/tiny"
    assert [c[0] for c in hub] == ["create_repo", "upload_folder"]
    assert hub[0][1:] == (
        "someone/tiny",
        "secret",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    upload = hub[1][1]
    assert Path(upload["folder_path"]) == folder and upload["repo_id"] == "someone/tiny"
    assert upload["commit_message"] == "v1" and upload["repo_type"] == "model"
    # the files huggingface_hub would send: the filter upload_folder applies
    ignored = upload["ignore_patterns"]
    sent = set(filter_repo_objects(sorted(files(folder)), ignore_patterns=ignored))
    assert sent == pipeline_files
    assert {"model_index.json", "vqvae/model.py", "README.md", "training_config.yaml"} <= sent
    # the card now names the repository
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == "someone/tiny"
    assert 'DiffusionPipeline.from_pretrained("someone/tiny", trust_remote_code=True)' in card.text
    assert 'LatentDiffusionPipeline.from_pretrained("someone/tiny")' in card.text
    assert '"pipeline"' not in card.text


def test_push_refuses_the_run_folder_around_the_pipeline(tmp_path, save_pipeline, hub):
    save_pipeline(tmp_path / "run" / "pipeline")
    with pytest.raises(ValueError, match=r"not a saved pipeline folder.*run/pipeline\?"):
        push_to_hub(tmp_path / "run", "someone/tiny")
    assert hub == []


def test_push_writes_a_card_for_a_folder_without_one(tmp_path, save_pipeline, hub):
    folder = save_pipeline(tmp_path / "cond", num_classes=3)
    assert not (folder / "README.md").exists()
    push_to_hub(folder, "someone/cond")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.model_name == "someone/cond"
    assert 'from_pretrained("someone/cond", trust_remote_code=True)' in card.text
    assert "ClassConditionalLatentDiffusionPipeline" in card.text


def run_script(name: str, monkeypatch, *argv: str) -> None:
    """``scripts/<name>`` run in this process (so HfApi's patched methods apply)."""
    from tests.launch import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.setattr("sys.argv", [name, *argv])
    runpy.run_path(str(ROOT / "scripts" / name), run_name="__main__")


def test_train_diffusion_push_to_hub_publishes_the_pipeline(
    tmp_path, tiny_tokenizer, hub, monkeypatch
):
    from tests.diffusion.test_train_diffusion import write_config

    tokenizer = tmp_path / "tokenizer"
    tiny_tokenizer(quantizer="vq").save_pretrained(tokenizer)
    config = write_config(tmp_path / "c.yaml", max_steps=1, validation_steps=1)
    out = tmp_path / "my-ldm"
    run_script(
        "train_diffusion.py",
        monkeypatch,
        "--config",
        str(config),
        "--tokenizer",
        str(tokenizer),
        "--output_dir",
        str(out),
        "--push_to_hub",
        "--hub_private_repo",
    )
    assert [c[0] for c in hub] == ["create_repo", "upload_folder"]
    assert hub[0][1] == "my-ldm" and hub[0][3]["private"]  # the output folder's name
    upload = hub[1][1]
    assert Path(upload["folder_path"]) == out / "pipeline" and upload["repo_id"] == "someone/my-ldm"
    assert (out / "checkpoint-1").is_dir() and (out / "latents").is_dir()  # stayed home


def test_a_failed_push_says_the_folder_is_intact_and_how_to_retry(
    tmp_path, save_pipeline, monkeypatch, capsys
):
    folder = save_pipeline(tmp_path / "pipeline")

    def offline(self, repo_id, **kwargs):
        raise ConnectionError("503 Service Unavailable")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(SystemExit) as exit:  # one line, no traceback
        run_script(
            "push_to_hub.py",
            monkeypatch,
            "--pipeline",
            str(folder),
            "--hub_model_id",
            "someone/tiny",
        )
    message = str(exit.value)
    assert "could not push" in message and "503" in message and "intact" in message
    assert f"push_to_hub.py --pipeline {folder} --hub_model_id someone/tiny" in message
