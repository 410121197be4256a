"""Class names, as diffusers' DiTPipeline has them: ``id2label`` saved in model_index.json and
restored by every loader, ``labels`` (synonyms included) and ``get_label_ids``; and the names of
the training data (class folders, a ``ClassLabel`` column) exported by the trainer."""

import json

import datasets
import numpy as np
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from PIL import Image

from engine.config import from_mapping
from engine.data import DataConfig, class_names
from pipelines import ClassConditionalLatentDiffusionPipeline
from tests.diffusion.test_train_diffusion import TINY, run
from tests.pipelines.test_pipelines import NUM_CLASSES, make_cond

ID2LABEL = {  # ImageNet's style: synonyms after commas; "crane" names two classes there
    0: "tench, Tinca tinca",
    1: "goldfish, Carassius auratus",
    4: "crane",
    9: "great white shark, white shark, man-eater, crane",
}
LABELS = {
    "Carassius auratus": 1,
    "Tinca tinca": 0,
    "crane": 9,  # the higher id, as DiTPipeline.labels has it
    "goldfish": 1,
    "great white shark": 9,
    "man-eater": 9,
    "tench": 0,
    "white shark": 9,
}


@pytest.fixture
def named(tiny_tokenizer) -> ClassConditionalLatentDiffusionPipeline:
    """The tiny class-conditional pipeline (10 classes) with ``ID2LABEL``."""
    vqvae = lambda **overrides: tiny_tokenizer(**{"scaling_factor": 0.7, **overrides}).eval()
    pipe = make_cond(vqvae)
    return ClassConditionalLatentDiffusionPipeline(**pipe.components, id2label=ID2LABEL)


def test_labels_and_get_label_ids_as_dit(named):
    assert named.labels == LABELS and list(named.labels) == sorted(LABELS)
    assert named.config.id2label == {str(k): v for k, v in ID2LABEL.items()}
    assert named.get_label_ids(["Tinca tinca", "goldfish", "tench", "white shark"]) == [0, 1, 0, 9]
    assert named.get_label_ids("goldfish") == [1]  # a name, not its letters
    assert named.get_label_ids([]) == []
    with pytest.raises(ValueError, match=r"unknown class names \['goldfsh', 'shark'\].*'goldfish'"):
        named.get_label_ids(["tench", "goldfsh", "shark"])
    with pytest.raises(ValueError, match=r"unknown class names \['zzz'\]; known names include \["):
        named.get_label_ids("zzz")  # no close match: some of the names instead


def test_without_id2label_there_are_no_names(named):
    bare = ClassConditionalLatentDiffusionPipeline(**named.components)
    assert bare.config.id2label is None and bare.labels == {}
    with pytest.raises(ValueError, match=r"\['tench'\].*no class names.*ids in \[0, 10\)"):
        bare.get_label_ids("tench")


@pytest.mark.parametrize(
    "id2label, message",
    [
        ({NUM_CLASSES: "x"}, r"id2label: 10 is no class id .*\[0, 10\)"),
        ({-1: "x"}, r"id2label: -1 is no class id"),
        ({"a": "x"}, r"id2label: 'a' is no class id"),
        ({0: ""}, r"id2label\[0\] must be a class name"),
        ({0: 3}, r"id2label\[0\] must be a class name.*got 3"),
        (["tench"], r"id2label must be a dict class id → name"),
    ],
)
def test_bad_id2label_is_refused(named, id2label, message):
    with pytest.raises(ValueError, match=message):
        ClassConditionalLatentDiffusionPipeline(**named.components, id2label=id2label)


def test_id2label_round_trip(named, tmp_path):
    named.save_pretrained(tmp_path / "a")
    saved = {str(k): v for k, v in ID2LABEL.items()}
    assert json.loads((tmp_path / "a" / "model_index.json").read_text())["id2label"] == saved
    loaded = {
        "installed": ClassConditionalLatentDiffusionPipeline.from_pretrained(tmp_path / "a"),
        "remote": DiffusionPipeline.from_pretrained(tmp_path / "a", trust_remote_code=True),
    }
    for name, pipe in loaded.items():
        assert pipe.config.id2label == saved and pipe.labels == LABELS, name
        assert pipe.get_label_ids(["goldfish", "man-eater"]) == [1, 9], name
        pipe.save_pretrained(tmp_path / name)  # and saved again
        index = json.loads((tmp_path / name / "model_index.json").read_text())
        assert index["id2label"] == saved, name
    # the names are the same images' ids
    run = dict(num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))
    images = loaded["installed"](loaded["installed"].get_label_ids(["tench", "crane"]), **run)
    run["generator"].manual_seed(0)
    assert np.array_equal(images.images, named([0, 9], **run).images)
    # from_pretrained(..., id2label=...) replaces them, as for DiTPipeline
    other = ClassConditionalLatentDiffusionPipeline.from_pretrained(
        tmp_path / "a", id2label={"3": "tiger"}
    )
    assert other.labels == {"tiger": 3}
    # a folder without names (saved before id2label existed) loads without them
    index = json.loads((tmp_path / "a" / "model_index.json").read_text())
    del index["id2label"]
    (tmp_path / "a" / "model_index.json").write_text(json.dumps(index))
    assert ClassConditionalLatentDiffusionPipeline.from_pretrained(tmp_path / "a").labels == {}


# ------------------------------------------------------------------------------ from the data


def write_folder(root, classes, count=6):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((16, 16, 3), 40 * c + 5 * i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_class_names_of_the_data(tmp_path):
    config = lambda **values: from_mapping(DataConfig, {"resolution": 16, **values}, "data")
    folder = write_folder(tmp_path / "folder", ["tench", "goldfish, Carassius auratus"])
    assert class_names(config(source=str(folder))) == ["goldfish, Carassius auratus", "tench"]
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "flat" / "a.png")
    assert class_names(config(source=str(tmp_path / "flat"))) is None  # no class folders
    table = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (16, 16))] * 2, "label": [0, 1], "plain": [0, 1]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=["tench, Tinca tinca", "goldfish"]),
                "plain": datasets.Value("int64"),
            }
        ),
    )
    table.save_to_disk(tmp_path / "saved")
    table.to_parquet(tmp_path / "table.parquet")
    for source in (tmp_path / "saved", tmp_path / "table.parquet"):
        names = class_names(config(source=str(source), label_column="label"))
        assert names == ["tench, Tinca tinca", "goldfish"], source
        assert class_names(config(source=str(source), label_column="plain")) is None
        assert class_names(config(source=str(source))) is None
    assert class_names(config(source="digits")) is None


def test_the_trainer_exports_the_class_names_of_the_data(tmp_path, tiny_tokenizer):
    folder = write_folder(tmp_path / "data", ["tench", "goldfish, Carassius auratus"])
    tokenizer = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(tokenizer)
    config = json.loads(json.dumps(TINY))
    config["unet"]["num_classes"] = 2
    config["data"] = {"source": str(folder), "resolution": 16, "validation_size": 2}
    config["train"].update(
        max_steps=1, batch_size=4, sample_every=100, validation_steps=100, checkpointing_steps=100
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run(tmp_path / "c.yaml", tokenizer, tmp_path / "run")
    pipe = ClassConditionalLatentDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.config.id2label == {"0": "goldfish, Carassius auratus", "1": "tench"}
    assert pipe.get_label_ids(["tench", "Carassius auratus"]) == [1, 0]
