"""pipelines.hub.push_to_hub, offline: what it asks the Hub API for (HfApi's methods replaced),
which files it uploads (an allow-list), what their content is (no path of this machine), and the
card it points at the repo."""

import json
import runpy
import warnings
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, RepoUrl

from pipelines import LatentDiffusionPipeline
from pipelines.export import describe_export
from pipelines.hub import HUB_TOKEN_WARNING, push_to_hub
from pipelines.model_card import record_evaluation

# what a run folder holds besides the pipeline, and what else may be left in the pipeline folder;
# none of it may be uploaded
JUNK = [
    ".env",
    "notes.txt",
    "checkpoint-1/model.safetensors",
    "checkpoint-3/model.safetensors",
    "checkpoint-4.partial/model.safetensors",
    "checkpoints/step_00000002/model.safetensors",
    "latents/shard-00000.safetensors",
    "latents/shard-00001.safetensors.partial",
    "logs/diffusion/events.out.tfevents.1700000000.host",
    "train.log",
    "unet/diffusion_pytorch_model.safetensors.partial",
    "unet/notes.txt",
    "vqvae/checkpoint-9/x.bin",
    "vqvae/.ipynb_checkpoints/config-checkpoint.json",
    "__pycache__/common.cpython-311.pyc",
]
# all that is uploaded of an unconditional pipeline folder
PIPELINE_FILES = {
    "README.md",
    "common.py",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "training_config.yaml",
    "unconditional.py",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vqvae/config.json",
    "vqvae/diffusion_pytorch_model.safetensors",
    "vqvae/model.py",
}


@pytest.fixture
def hub(monkeypatch):
    """HfApi's create_repo and create_commit, recorded instead of called."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, self.token, kwargs))
        full = repo_id if "/" in repo_id else f"someone/{repo_id}"  # the Hub adds the user
        return RepoUrl(f"https://huggingface.co/{full}")

    def create_commit(self, **kwargs):
        calls.append(("create_commit", kwargs))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def uploaded(commit: dict) -> dict[str, bytes]:
    """What a recorded ``create_commit`` sends: path in the repository → content."""
    sent = {}
    for operation in commit["operations"]:
        with operation.as_file() as f:
            sent[operation.path_in_repo] = f.read()
    return sent


def test_push_uploads_the_pipeline_files_and_nothing_else(tmp_path, save_pipeline, hub):
    folder = save_pipeline(tmp_path / "run" / "pipeline")
    describe_export(folder, {"data": {"source": "digits"}}, tmp_path / "none", False)
    assert files(folder) == PIPELINE_FILES
    for name in JUNK:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("not for the Hub")

    url = push_to_hub(folder, "someone/tiny", private=True, token="secret", commit_message="v1")

    assert url == "https://huggingface.co/someone/tiny"
    assert [c[0] for c in hub] == ["create_repo", "create_commit"]
    assert hub[0][1:] == (
        "someone/tiny",
        "secret",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    commit = hub[1][1]
    assert commit["repo_id"] == "someone/tiny" and commit["repo_type"] == "model"
    assert commit["commit_message"] == "v1"
    sent = uploaded(commit)
    assert set(sent) == PIPELINE_FILES
    weights = "vqvae/diffusion_pytorch_model.safetensors"
    assert sent[weights] == (folder / weights).read_bytes()
    # the card now names the repository, and goes up as it is in the folder
    card = ModelCard.load(folder / "README.md")
    assert sent["README.md"].decode() == (folder / "README.md").read_text()
    assert card.data.model_name == "someone/tiny"
    assert 'DiffusionPipeline.from_pretrained("someone/tiny", trust_remote_code=True)' in card.text
    assert 'LatentDiffusionPipeline.from_pretrained("someone/tiny")' in card.text
    assert '"pipeline"' not in card.text


def test_no_path_of_this_machine_is_uploaded(tmp_path, save_pipeline, hub):
    """A pipeline loaded from a folder and saved again (the folder it was read from is then the
    ``_name_or_path`` of model_index.json and of the models' configs), trained on a local folder,
    with a tokenizer run config naming local paths and an evaluation in its card."""
    data = tmp_path / "images"
    data.mkdir()
    tokenizer_run = tmp_path / "tok"
    (tokenizer_run / "tokenizer").mkdir(parents=True)
    (tokenizer_run / "config.yaml").write_text(f"data:\n  source: {data}\ninit_from: ~/x.pt\n")
    first = save_pipeline(tmp_path / "first")
    folder = tmp_path / "run" / "pipeline"
    LatentDiffusionPipeline.from_pretrained(first).save_pretrained(folder)
    assert str(first) in (folder / "vqvae" / "config.json").read_text()  # diffusers' doing
    config = {"data": {"source": str(data)}, "cache": {"dir": str(tmp_path / "latents")}}
    describe_export(folder, config, tokenizer_run / "tokenizer", False)
    record_evaluation(
        folder,
        {
            "metrics": {"fid": 12.5},
            "date": "today",
            "sampling": {"num_samples": 10, "steps": 5, "eta": 0.0, "guidance_scale": None},
            "reference": {
                "key": "images-train-16px-abc",
                "images": 20,
                "part": "train",
                "source": str(data),
                "cache_file": str(tmp_path / "cache" / "images-train.pt"),
            },
            "pipeline": {"path": str(folder)},
        },
    )

    push_to_hub(folder, "someone/tiny")

    sent = uploaded(hub[1][1])
    assert set(sent) == PIPELINE_FILES
    for name, content in sent.items():
        assert str(tmp_path).encode() not in content, name
        if name.endswith(".json"):
            assert "_name_or_path" not in json.loads(content), name
    # local paths go up as ".../<last part>"; the folder keeps them (sample.py and eval_fid.py
    # read data.source from it)
    public = yaml.safe_load(sent["training_config.yaml"])
    assert public["diffusion"]["data"]["source"] == ".../images"
    assert public["diffusion"]["cache"]["dir"] == ".../latents"
    assert public["tokenizer"] == {"data": {"source": ".../images"}, "init_from": ".../x.pt"}
    local = yaml.safe_load((folder / "training_config.yaml").read_text())
    assert local["diffusion"]["data"]["source"] == str(data)
    card = sent["README.md"].decode()
    assert '"cache_file": ".../images-train.pt"' in card and '"path": ".../pipeline"' in card
    assert "| FID | KID | IS | precision / recall |" in card  # no path where there is none
    assert ModelCard(card).data.eval_results[0].metric_value == 12.5
    # the rest as it is
    assert sent["vqvae/model.py"] == (folder / "vqvae" / "model.py").read_bytes()
    unet = json.loads((folder / "unet" / "config.json").read_text())
    del unet["_name_or_path"]
    assert json.loads(sent["unet/config.json"]) == unet


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
    assert [c[0] for c in hub] == ["create_repo", "create_commit"]
    assert hub[0][1] == "my-ldm" and hub[0][3]["private"]  # the output folder's name
    commit = hub[1][1]
    assert commit["repo_id"] == "someone/my-ldm"
    sent = uploaded(commit)
    assert set(sent) == files(out / "pipeline") == PIPELINE_FILES
    assert (out / "checkpoint-1").is_dir() and (out / "latents").is_dir()  # stayed home
    # the tokenizer was loaded from tmp_path/tokenizer: its config says so, the upload does not
    assert str(tmp_path) in (out / "pipeline" / "vqvae" / "config.json").read_text()
    assert not [name for name, content in sent.items() if str(tmp_path).encode() in content]


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


def test_a_token_on_the_command_line_is_used_with_a_warning(
    tmp_path, save_pipeline, hub, monkeypatch
):
    folder = save_pipeline(tmp_path / "pipeline")
    args = ["--pipeline", str(folder), "--hub_model_id", "someone/tiny"]
    with pytest.warns(UserWarning, match="HF_TOKEN") as caught:
        run_script("push_to_hub.py", monkeypatch, *args, "--hub_token", "hf_secret")
    assert str(caught[0].message) == HUB_TOKEN_WARNING and "hf auth login" in HUB_TOKEN_WARNING
    assert hub[0][2] == "hf_secret"  # still used

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_script("push_to_hub.py", monkeypatch, *args)
    assert HUB_TOKEN_WARNING not in [str(w.message) for w in caught]
    assert hub[2][2] is None  # HF_TOKEN or the login's, as huggingface_hub finds it
