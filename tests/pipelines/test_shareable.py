"""The saved pipeline folder as a self-contained, shareable artifact: diffusers loads it (from the
folder and from a Hub snapshot) with no package of ours, the installed classes load it running no
code from it (also folders of the previous layout), saving a loaded pipeline carries its model card
and training configs, and half precision keeps the codebook float32."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import get_relative_imports

import pipelines.common
from pipelines import ClassConditionalLatentDiffusionPipeline, LatentDiffusionPipeline
from pipelines.export import describe_export
from pipelines.sampling import load_pipeline, training_config
from tests.isolated import BLOCKED, FAKE_HUB, finish, start_without_project
from tokenizer import VQTokenizer

STEPS = 3
KINDS = {  # kind → (class, number of classes, labels to sample)
    "uncond": (LatentDiffusionPipeline, 0, None),
    "cond": (ClassConditionalLatentDiffusionPipeline, 5, [3, 1]),
}


def sample(pipe, labels=None, **kwargs):
    """Two images, seed 0, as the isolated processes draw them."""
    pipe.set_progress_bar_config(disable=True)
    args, extra = ((labels,), {"guidance_scale": 2.0}) if labels else ((), {"batch_size": 2})
    generator = torch.Generator().manual_seed(0)
    return pipe(
        *args, **extra, generator=generator, num_inference_steps=STEPS, output_type="np", **kwargs
    ).images


ISOLATED = """
import json
import sys

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import get_relative_imports


def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    args, extra = ((LABELS,), {"guidance_scale": 2.0}) if LABELS else ((), {"batch_size": 2})
    generator = torch.Generator().manual_seed(0)
    return pipe(*args, **extra, generator=generator, num_inference_steps=STEPS,
                output_type="np").images


info = {}
for name, where in (("folder", REMOTE), ("hub", REPO)):
    pipe = DiffusionPipeline.from_pretrained(where, trust_remote_code=True)
    np.save(name + ".npy", sample(pipe))
    info[name] = [type(c).__module__ + "." + type(c).__name__ for c in (pipe, pipe.vqvae)]
info["imported"] = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
info["fetched"] = sorted(p.relative_to(SNAPSHOT).as_posix() for p in SNAPSHOT.rglob("*")
                         if p.is_file())
json.dump(info, open("info.json", "w"))
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory, save_pipeline):
    """Both pipelines saved (with card and training configs), their images through the
    installed classes, and, from two isolated processes (at once), their images and classes
    loaded by ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` from the
    folder and from a Hub repository serving it."""
    tmp = tmp_path_factory.mktemp("shared")
    folders, expected, runs = {}, {}, {}
    for kind, (cls, num_classes, labels) in KINDS.items():
        folder = save_pipeline(tmp / kind, num_classes=num_classes)
        describe_export(folder, {"data": {"source": "digits"}}, tmp / "none", bool(num_classes))
        folders[kind] = folder
        expected[kind] = sample(cls.from_pretrained(folder), labels)
        workdir = tmp / f"isolated-{kind}"
        workdir.mkdir()
        header = (
            f"REMOTE, SNAPSHOT = {str(folder)!r}, {str(workdir / 'snapshot')!r}\n"
            f"REPO, LABELS, STEPS = 'someone/tiny-{kind}', {labels!r}, {STEPS}\n"
            f"BLOCKED = {BLOCKED!r}\n"
        )
        runs[kind] = (workdir, start_without_project(header + FAKE_HUB + ISOLATED, workdir))
    loaded = {}
    for kind, (workdir, process) in runs.items():
        output = finish(process)
        info = json.loads((workdir / "info.json").read_text())
        images = {name: np.load(workdir / f"{name}.npy") for name in ("folder", "hub")}
        loaded[kind] = (images, info, output)
    return folders, expected, loaded


def test_folder_names_the_code_it_carries(shared):
    folders, _, _ = shared
    for kind, module in (("uncond", "unconditional"), ("cond", "class_conditional")):
        folder = folders[kind]
        index = json.loads((folder / "model_index.json").read_text())
        assert index["vqvae"] == ["model", "VQTokenizer"]
        assert index["_class_name"][0] == module
        config = json.loads((folder / "vqvae" / "config.json").read_text())
        assert config["auto_map"] == {"AutoModel": "model.VQTokenizer"}
        # what diffusers copies into its modules cache: the pipeline module's direct relative
        # imports; the tokenizer's file imports nothing relatively (a Hub download brings
        # vqvae/model.py and no other file of vqvae/)
        assert get_relative_imports(folder / "vqvae" / "model.py") == []
        code = (folder / "vqvae" / "model.py").read_text()
        assert "class VQTokenizer(" in code and "class ClusteredQuantizer(" in code
        assert get_relative_imports(folder / f"{module}.py") == ["common"]
        assert get_relative_imports(folder / "common.py") == []
        for file in (f"{module}.py", "common.py"):
            source = (folder / file).read_text()
            assert "import tokenizer" not in source and "from tokenizer" not in source


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_loads_folder_and_hub_repo_without_our_packages(shared, kind):
    _, expected, loaded = shared
    images, info, output = loaded[kind]
    for where in ("folder", "hub"):
        np.testing.assert_array_equal(images[where], expected[kind], err_msg=where)
        pipeline, vqvae = info[where]
        assert pipeline.startswith("diffusers_modules.") and vqvae.startswith("diffusers_modules.")
        assert vqvae.endswith(".model.VQTokenizer")
    assert info["imported"] == []
    assert "pip install" not in output  # diffusers' check_imports found every import
    # the Hub download fetched the tokenizer's one file, and nothing of ours beyond the folder
    fetched = info["fetched"]
    assert "vqvae/model.py" in fetched and "common.py" in fetched
    assert [f for f in fetched if f.startswith("vqvae/") and f.endswith(".py")] == [
        "vqvae/model.py"
    ]


def test_installed_classes_run_no_code_from_the_folder(shared, tmp_path):
    folders, expected, _ = shared
    folder = shutil.copytree(folders["uncond"], tmp_path / "tampered")
    for file in ("unconditional.py", "common.py", "vqvae/model.py"):
        (folder / file).write_text("raise RuntimeError('code from the folder ran')\n")
    for pipe in (LatentDiffusionPipeline.from_pretrained(folder), load_pipeline(folder)):
        assert type(pipe) is LatentDiffusionPipeline and type(pipe.vqvae) is VQTokenizer
    np.testing.assert_array_equal(sample(load_pipeline(folder)), expected["uncond"])


def test_folders_of_the_previous_layout_still_load(shared, tmp_path):
    folders, expected, _ = shared
    for kind, (cls, _, labels) in KINDS.items():
        folder = shutil.copytree(folders[kind], tmp_path / kind)
        index = json.loads((folder / "model_index.json").read_text())
        index["vqvae"] = ["tokenizer.model", "VQTokenizer"]  # as the previous version wrote it
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "vqvae" / "model.py").unlink()
        config = json.loads((folder / "vqvae" / "config.json").read_text())
        del config["auto_map"]
        (folder / "vqvae" / "config.json").write_text(json.dumps(config))
        for pipe in (cls.from_pretrained(folder), load_pipeline(folder)):
            assert type(pipe) is cls and type(pipe.vqvae) is VQTokenizer
            np.testing.assert_array_equal(sample(pipe, labels), expected[kind])
        # and saving it again writes the shareable layout
        cls.from_pretrained(folder).save_pretrained(tmp_path / f"{kind}-again")
        again = json.loads((tmp_path / f"{kind}-again" / "model_index.json").read_text())
        assert again["vqvae"] == ["model", "VQTokenizer"]


def test_a_loaded_pipeline_saved_elsewhere_keeps_card_and_training_configs(shared, tmp_path):
    folders, _, _ = shared
    origin = folders["cond"]
    (origin / "README.md").write_text((origin / "README.md").read_text() + "\nthe card of A\n")
    copies = {
        "installed": ClassConditionalLatentDiffusionPipeline.from_pretrained(origin),
        "remote": DiffusionPipeline.from_pretrained(origin, trust_remote_code=True),
    }
    for name, pipe in copies.items():
        pipe.save_pretrained(tmp_path / name)
        for file in ("README.md", "training_config.yaml"):
            assert (tmp_path / name / file).read_text() == (origin / file).read_text(), file
        assert training_config(tmp_path / name) == training_config(origin) != {}
        # and the shareable layout, with the same tokenizer code, however it was loaded
        index = json.loads((tmp_path / name / "model_index.json").read_text())
        assert index["vqvae"] == ["model", "VQTokenizer"]
        assert index["_class_name"] == ["class_conditional", type(pipe).__name__]
        code = (tmp_path / name / "vqvae" / "model.py").read_text()
        assert code == (origin / "vqvae" / "model.py").read_text()
    # a pipeline built in memory has neither
    built = ClassConditionalLatentDiffusionPipeline(**copies["installed"].components)
    built.save_pretrained(tmp_path / "built")
    assert not (tmp_path / "built" / "README.md").exists()
    assert not (tmp_path / "built" / "training_config.yaml").exists()


def test_installed_class_loads_a_hub_repo_id(shared, tmp_path, monkeypatch):
    """<Class>.from_pretrained("user/repo") reads the repository's snapshot (diffusers' own
    download would ask for trust_remote_code) and keeps its card when saved elsewhere."""
    folders, expected, _ = shared
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return str(folders["uncond"])

    monkeypatch.setattr(pipelines.common, "snapshot_download", snapshot_download)
    pipe = LatentDiffusionPipeline.from_pretrained("someone/tiny", revision="v1")
    assert asked == [("someone/tiny", {"revision": "v1"})]
    assert type(pipe.vqvae) is VQTokenizer and pipe.name_or_path == "someone/tiny"
    np.testing.assert_array_equal(sample(pipe), expected["uncond"])
    pipe.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").is_file()


class Messages(logging.Handler):
    """Collects what diffusers logs (its loggers propagate to the "diffusers" logger)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_messages():
    handler = Messages()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_bfloat16_pipeline_keeps_the_codebook_float32_and_samples(shared, diffusers_messages):
    folders, expected, _ = shared
    for kind, (cls, _, labels) in KINDS.items():
        pipe = cls.from_pretrained(folders[kind])
        codebook = pipe.vqvae.vector_quantizer.codebook.detach().clone()
        buffers = {n: b.dtype for n, b in pipe.vqvae.vector_quantizer.named_buffers()}
        pipe.to(torch.bfloat16)
        assert pipe.unet.dtype == torch.bfloat16 and pipe.vqvae.dtype == torch.bfloat16
        quantizer = pipe.vqvae.vector_quantizer
        assert quantizer.codebook.dtype == torch.float32
        assert torch.equal(quantizer.codebook, codebook)  # not rounded through bfloat16
        assert {n: b.dtype for n, b in quantizer.named_buffers()} == buffers
        images = sample(pipe, labels)  # bfloat16 UNet and decoder, float32 codebook, on the CPU
        assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
        assert np.abs(images - expected[kind]).max() < 0.1  # close to the float32 images
    # diffusers' ModelMixin.to warns on a cast of a model with _keep_in_fp32_modules that they
    # may give "inconsistent results"; the tokenizer keeps them float32, so not about it (the
    # UNet's warning, about its [] modules, shows that the warnings are seen)
    assert not [m for m in diffusers_messages if "VQTokenizer" in m], diffusers_messages
    assert [m for m in diffusers_messages if "UNet2DModel" in m]
