"""The model card: Hub metadata through huggingface_hub's ModelCard / ModelCardData, loading
snippets that run, and evaluations in both the table and the metadata's model-index."""

import re

import numpy as np
import torch
from huggingface_hub import ModelCard

from pipelines.export import describe_export
from pipelines.model_card import TAGS, dataset_name, record_evaluation, write_model_card


def report(fid, steps, source=None, part="train"):
    reference = {"key": f"set-{part}-16px-abc", "images": 20, "part": part}
    if source:
        reference["source"] = source
    return {
        "metrics": {"fid": fid},
        "date": "today",
        "sampling": {"num_samples": 10, "steps": steps, "eta": 0.0, "guidance_scale": None},
        "reference": reference,
    }


def test_card_metadata_and_snippets_that_load_the_folder(tmp_path, save_pipeline):
    folder = save_pipeline(tmp_path / "cond", num_classes=4)
    config = {"data": {"source": "someone/faces"}, "train": {"sample_steps": 5}}
    describe_export(folder, config, tmp_path / "none", True)
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag) == ("diffusers", "image-generation")
    assert set(TAGS) <= set(data.tags) and data.datasets == ["someone/faces"]
    assert data.model_name == "cond" and data.eval_results is None
    assert "### diffusion" in card.text and "Not evaluated yet" in card.text
    # both snippets run as written (on the folder, with fewer steps)
    snippets = re.findall(r"```python\n(.*?)```", card.text, re.S)
    assert 'DiffusionPipeline.from_pretrained("cond", trust_remote_code=True)' in snippets[0]
    assert 'ClassConditionalLatentDiffusionPipeline.from_pretrained("cond")' in snippets[1]
    for snippet in snippets:
        code = snippet.replace('"cond"', repr(str(folder))).replace("=50", "=2")
        scope = {}
        exec(code, scope)
        if "images" in scope:
            assert len(scope["images"]) == 4 and np.asarray(scope["images"][0]).shape == (16, 16, 3)
        assert isinstance(scope["pipe"].unet.dtype, torch.dtype)
    # a repository id instead of the folder's name
    write_model_card(folder, "ClassConditionalLatentDiffusionPipeline", {}, True, "someone/x")
    card = ModelCard.load(folder / "README.md")
    assert 'DiffusionPipeline.from_pretrained("someone/x", trust_remote_code=True)' in card.text
    assert card.data.datasets is None


def test_evaluations_go_into_table_and_model_index(tmp_path, save_pipeline):
    folder = save_pipeline(tmp_path / "uncond")
    describe_export(folder, {"data": {"source": "/data/my-faces"}}, tmp_path / "none", False)
    record_evaluation(folder, report(12.5, 2))
    record_evaluation(folder, report(11.25, 2))  # same protocol: replaces 12.5
    record_evaluation(folder, report(9.75, 4, part="validation"))
    record_evaluation(folder, report(20.0, 4, source="cifar10"))  # another reference data set
    raw = (folder / "README.md").read_text()
    card = ModelCard(raw)
    assert "model-index:" in raw and "| 11.25 |" in raw and "12.50" not in raw
    results = card.data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [
        ("fid", 11.25),
        ("fid", 9.75),
        ("fid", 20.0),
    ]
    assert {r.task_type for r in results} == {"unconditional-image-generation"}
    # the training config's local folder is named by its name, the reference's source as is
    assert [r.dataset_name for r in results] == ["my-faces", "my-faces", "cifar10"]
    assert [r.dataset_split for r in results] == ["train", "validation", "train"]
    assert "4 steps" in results[1].metric_config and "set-validation" in results[1].metric_config
    # the card's other metadata and text stay
    assert card.data.library_name == "diffusers" and "## Training configs" in card.text


def test_a_card_without_metadata_gets_it_with_the_first_evaluation(tmp_path):
    (tmp_path / "README.md").write_text("# my pipeline\n\nkept text\n")
    record_evaluation(tmp_path, report(12.5, 2))
    card = ModelCard.load(tmp_path / "README.md")
    assert "kept text" in card.text and "| 12.50 |" in card.text
    assert card.data.model_name == tmp_path.name
    assert card.data.eval_results[0].dataset_name == "unknown"


def test_dataset_names():
    assert dataset_name("cifar10") == "cifar10" and dataset_name("digits") == "digits"
    assert dataset_name("/home/me/data/faces") == "faces"
    assert dataset_name("./train.parquet") == "train.parquet"
    assert dataset_name("lsun:/data/church_outdoor_train_lmdb") == "lsun:church_outdoor_train_lmdb"
    assert dataset_name(None) is None
