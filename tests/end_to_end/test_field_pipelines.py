"""Stage two on the latents of each of the field's quantizers (FSQ, LFQ, SimVQ, IBQ), and the
exported pipelines loaded by diffusers with ``trust_remote_code=True`` in a process where this
project cannot be imported: the same images as through the installed classes."""

import json

import numpy as np
import pytest
import torch

from pipelines import LatentDiffusionPipeline
from tests.diffusion.test_train_diffusion import run, write_config
from tests.isolated import BLOCKED, run_without_project

pytestmark = pytest.mark.slow  # four trainings of stage two

KINDS = {  # the tiny tokenizer's embed_dim is 4
    "fsq": {"levels": [8, 5, 5, 5]},
    "lfq": {"code_dim": 4},
    "simvq": {"num_codes": 16},
    "ibq": {"num_codes": 16},
}

ISOLATED = """
import json
import sys

import numpy as np
import torch
from diffusers import DiffusionPipeline

classes = {}
for kind, folder in FOLDERS.items():
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.save(kind + ".npy", images)
    classes[kind] = type(pipe.vqvae.vector_quantizer).__module__
classes["imported"] = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
json.dump(classes, open("classes.json", "w"))
"""


def test_stage_two_trains_on_each_kind_and_its_pipeline_loads_anywhere(tmp_path, tiny_tokenizer):
    config = write_config(tmp_path / "c.yaml", max_steps=2, sample_every=2, validation_steps=2)
    folders, expected = {}, {}
    for kind, options in KINDS.items():
        tokenizer = tmp_path / kind / "tokenizer"
        tiny_tokenizer(quantizer=kind, quantizer_options=options).save_pretrained(tokenizer)
        run(config, tokenizer, tmp_path / kind / "run")
        folders[kind] = str(tmp_path / kind / "run" / "pipeline")
        pipe = LatentDiffusionPipeline.from_pretrained(folders[kind])
        assert pipe.vqvae.config.quantizer == kind
        assert pipe.vqvae.config.scaling_factor not in (0.0, 1.0)  # measured on its latents
        pipe.set_progress_bar_config(disable=True)
        expected[kind] = pipe(
            batch_size=2,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    run_without_project(
        f"FOLDERS, BLOCKED = {folders!r}, {BLOCKED!r}\n" + ISOLATED, tmp_path, timeout=600
    )
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes.pop("imported") == []
    for kind in KINDS:
        assert classes[kind].startswith("diffusers_modules"), classes[kind]
        np.testing.assert_array_equal(np.load(tmp_path / f"{kind}.npy"), expected[kind])
