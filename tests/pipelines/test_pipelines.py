"""The sampling pipelines: outputs, equality with diffusers' LDMPipeline, classifier-free guidance,
input checks, and save → load in fresh processes (our class, DiffusionPipeline with the folder's
code, diffusers' LDMPipeline on the saved components)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, LDMPipeline, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipelines import (
    ClassConditionalLatentDiffusionPipeline,
    LatentDiffusionPipeline,
    default_scheduler,
)

NUM_CLASSES = 10
STEPS = 4
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)


@pytest.fixture(scope="session")
def tiny_vqvae(tiny_tokenizer):
    """conftest's tiny tokenizer (latents 4×8×8) with a latent scale, in eval mode."""
    return lambda **overrides: tiny_tokenizer(**{"scaling_factor": 0.7, **overrides}).eval()


def tiny_unet(**overrides) -> UNet2DModel:
    torch.manual_seed(1)
    return UNet2DModel(**{**UNET, **overrides}).eval()


def seed(n: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def make_uncond(tiny_vqvae) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline(
        vqvae=tiny_vqvae(), unet=tiny_unet(), scheduler=default_scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_cond(tiny_vqvae) -> ClassConditionalLatentDiffusionPipeline:
    pipe = ClassConditionalLatentDiffusionPipeline(
        vqvae=tiny_vqvae(),
        unet=tiny_unet(num_class_embeds=NUM_CLASSES + 1),
        scheduler=default_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def uncond(tiny_vqvae) -> LatentDiffusionPipeline:
    return make_uncond(tiny_vqvae)


@pytest.fixture
def cond(tiny_vqvae) -> ClassConditionalLatentDiffusionPipeline:
    return make_cond(tiny_vqvae)


def sample(pipe, **kwargs):
    """Two images (labels 3 and 7 for the class-conditional pipeline), seed 0, STEPS steps."""
    kwargs = {"generator": seed(0), "num_inference_steps": STEPS, "output_type": "np", **kwargs}
    if isinstance(pipe, ClassConditionalLatentDiffusionPipeline):
        return pipe([3, 7], **kwargs).images
    return pipe(batch_size=2, **kwargs).images


# ------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_output_types_and_shapes(kind, request):
    pipe = request.getfixturevalue(kind)
    arrays = sample(pipe)
    assert isinstance(arrays, np.ndarray) and arrays.shape == (2, 16, 16, 3)
    assert arrays.dtype == np.float32 and arrays.min() >= 0 and arrays.max() <= 1
    assert arrays.std() > 0.01 and not np.allclose(arrays[0], arrays[1])
    tensors = sample(pipe, output_type="pt")
    assert isinstance(tensors, torch.Tensor) and tensors.shape == (2, 3, 16, 16)
    assert np.array_equal(tensors.permute(0, 2, 3, 1).numpy(), arrays)
    pils = sample(pipe, output_type="pil")
    assert len(pils) == 2 and all(isinstance(p, Image.Image) for p in pils)
    assert pils[0].size == (16, 16) and pils[0].mode == "RGB"
    assert np.array_equal(np.asarray(pils[1]), (arrays[1] * 255).round().astype(np.uint8))
    output = pipe(*([[3, 7]] if kind == "cond" else [2]), num_inference_steps=1, return_dict=False)
    assert isinstance(output, tuple) and len(output[0]) == 2
    with pytest.raises(ValueError, match="output_type.*'pt', 'latent'.*'latents'"):
        sample(pipe, output_type="latents")


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_quantize_false_skips_the_requantization(kind, request):
    pipe = request.getfixturevalue(kind)
    default = sample(pipe)
    assert np.array_equal(default, sample(pipe, quantize=True))
    assert np.abs(default - sample(pipe, quantize=False)).max() > 1e-3


def test_given_latents_replace_the_drawn_noise(uncond):
    noise = randn_tensor((2, 4, 8, 8), generator=seed(0))
    assert np.array_equal(sample(uncond, generator=None, latents=noise), sample(uncond))
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\).*\(2, 4, 4, 4\)"):
        sample(uncond, latents=torch.zeros(2, 4, 4, 4))


# ------------------------------------------------------------------------------ unconditional


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_unconditional_equals_diffusers_ldm_pipeline(uncond, scheduler):
    if scheduler == "euler":  # init_noise_sigma != 1 and a real scale_model_input
        uncond.scheduler = EulerDiscreteScheduler.from_config(uncond.scheduler.config)
    ldm = LDMPipeline(vqvae=uncond.vqvae, unet=uncond.unet, scheduler=uncond.scheduler)
    ldm.set_progress_bar_config(disable=True)
    expected = ldm(
        2, generator=seed(0), num_inference_steps=STEPS, eta=0.0, output_type="np"
    ).images
    ours = sample(uncond)
    assert np.abs(ours - expected).max() < 1e-6
    assert np.abs(sample(uncond, generator=seed(1)) - expected).max() > 1e-3


def test_stochastic_steps_draw_from_the_generator(uncond):
    torch.manual_seed(1)
    first = sample(uncond, eta=1.0)
    torch.manual_seed(2)  # the global RNG must not matter
    assert np.array_equal(sample(uncond, eta=1.0), first)
    assert np.abs(sample(uncond, eta=0.0) - first).max() > 1e-3


def test_unconditional_refuses_class_labels(uncond):
    with pytest.raises(TypeError, match="unconditional.*ClassConditionalLatentDiffusionPipeline"):
        uncond(class_labels=[1, 2])
    with pytest.raises(TypeError, match="unconditional.*ClassConditionalLatentDiffusionPipeline"):
        uncond(batch_size=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="batch_size.*unconditional"):
        uncond([1, 2])  # labels passed positionally
    with pytest.raises(TypeError, match="unexpected.*num_steps"):
        uncond(num_steps=2)


# ------------------------------------------------------------------------------ class-conditional


def reference(pipe, labels, guidance_scale):
    """Classifier-free guidance written out: separate UNet calls for y and for the null class."""
    latents = randn_tensor((len(labels), 4, 8, 8), generator=seed(0))
    labels = torch.tensor(labels)
    null = torch.full_like(labels, NUM_CLASSES)
    pipe.scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            eps = pipe.unet(latents, t, class_labels=labels).sample
            if guidance_scale != 1:
                uncond_eps = pipe.unet(latents, t, class_labels=null).sample
                eps = uncond_eps + guidance_scale * (eps - uncond_eps)
            latents = pipe.scheduler.step(eps, t, latents).prev_sample
        images = pipe.vqvae.decode(latents / 0.7).sample
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_guidance_scale_one_is_the_plain_conditional_prediction(cond):
    assert np.array_equal(sample(cond, guidance_scale=1.0), reference(cond, [3, 7], 1.0))


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_guidance_combines_conditional_and_null_class_predictions(cond, guidance_scale):
    guided = sample(cond, guidance_scale=guidance_scale)
    assert np.abs(guided - reference(cond, [3, 7], guidance_scale)).max() < 1e-5
    assert np.abs(guided - sample(cond, guidance_scale=1.0)).max() > 1e-3


def test_null_class_is_used_for_the_unconditional_branch(cond):
    calls = []
    cond.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((len(args[0]), kwargs["class_labels"].tolist())),
        with_kwargs=True,
    )
    assert cond.num_classes == NUM_CLASSES and cond.null_class == NUM_CLASSES
    sample(cond, guidance_scale=2.0)
    assert calls == [(4, [3, 7, NUM_CLASSES, NUM_CLASSES])] * STEPS  # one doubled batch a step
    calls.clear()
    sample(cond, guidance_scale=1.0)
    assert calls == [(2, [3, 7])] * STEPS  # no doubling
    assert (
        np.abs(
            sample(cond, guidance_scale=1.0)[0]
            - cond(
                [4, 7],
                guidance_scale=1.0,
                generator=seed(0),
                num_inference_steps=STEPS,
                output_type="np",
            ).images[0]
        ).max()
        > 1e-3
    )  # the label matters


def test_class_labels_are_checked(cond):
    run = dict(num_inference_steps=1, output_type="np")
    for bad, label in (([3, NUM_CLASSES], NUM_CLASSES), ([-1], -1), (11, 11)):
        with pytest.raises(ValueError, match=rf"class label {label} .*\[0, {NUM_CLASSES}\)"):
            cond(bad, **run)
    with pytest.raises(ValueError, match="empty"):
        cond([], **run)
    with pytest.raises(ValueError, match="integers"):
        cond([1.5], **run)
    with pytest.raises(ValueError, match="guidance_scale"):
        cond([1], guidance_scale=-1.0, **run)
    assert cond(3, **run).images.shape == (1, 16, 16, 3)
    assert np.array_equal(
        cond(torch.tensor([3, 7]), generator=seed(0), **run).images,
        cond([3, 7], generator=seed(0), **run).images,
    )


# ------------------------------------------------------------------------------ components


def test_mismatched_tokenizer_and_unet_are_refused(tiny_vqvae):
    scheduler = default_scheduler()
    with pytest.raises(ValueError, match="latents are 8×8×8.*UNet takes 4×8×8"):
        LatentDiffusionPipeline(tiny_vqvae(embed_dim=8), tiny_unet(), scheduler)
    with pytest.raises(ValueError, match="latents are 4×16×16.*UNet takes 4×8×8"):
        LatentDiffusionPipeline(tiny_vqvae(resolution=32), tiny_unet(), scheduler)
    with pytest.raises(ValueError, match="predicts 8 channels"):
        LatentDiffusionPipeline(tiny_vqvae(), tiny_unet(out_channels=8), scheduler)
    with pytest.raises(ValueError, match="latents are 4×8×8.*UNet takes 8×8×8"):
        ClassConditionalLatentDiffusionPipeline(
            tiny_vqvae(), tiny_unet(in_channels=8, out_channels=8, num_class_embeds=3), scheduler
        )
    with pytest.raises(ValueError, match="class-conditional.*use ClassConditional"):
        LatentDiffusionPipeline(tiny_vqvae(), tiny_unet(num_class_embeds=3), scheduler)
    with pytest.raises(ValueError, match="needs a class-conditional UNet.*num_class_embeds=None"):
        ClassConditionalLatentDiffusionPipeline(tiny_vqvae(), tiny_unet(), scheduler)


def test_mismatch_is_refused_when_loading(uncond, tmp_path):
    uncond.save_pretrained(tmp_path)
    LatentDiffusionPipeline.from_pretrained(tmp_path)  # loads as saved
    tiny_unet(sample_size=4).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="latents are 4×8×8.*UNet takes 4×4×4"):
        LatentDiffusionPipeline.from_pretrained(tmp_path)


def test_diffusers_asks_before_running_the_saved_code(uncond, tmp_path):
    uncond.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_default_scheduler_is_ldm_ddim():
    config = default_scheduler().config
    assert type(default_scheduler()).__name__ == "DDIMScheduler"
    assert (
        config.num_train_timesteps,
        config.beta_start,
        config.beta_end,
        config.beta_schedule,
        config.clip_sample,
        config.set_alpha_to_one,
        config.steps_offset,
        config.prediction_type,
    ) == (1000, 0.0015, 0.0195, "scaled_linear", False, False, 1, "epsilon")
    assert default_scheduler(500).config.num_train_timesteps == 500


# ------------------------------------------------------------------------------ save → load

LOADERS = {  # (a) our class, (b) diffusers with the folder's code, (c) diffusers' LDMPipeline
    "ours": "import pipelines\npipe = pipelines.{cls}.from_pretrained({folder!r})",
    "diffusers": "from diffusers import DiffusionPipeline\n"
    "pipe = DiffusionPipeline.from_pretrained({folder!r}, trust_remote_code=True)",
    "ldm": "from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel\n"
    "from tokenizer import VQTokenizer\n"
    "pipe = LDMPipeline(vqvae=VQTokenizer.from_pretrained({folder!r}, subfolder='vqvae'),\n"
    "    unet=UNet2DModel.from_pretrained({folder!r}, subfolder='unet'),\n"
    "    scheduler=DDIMScheduler.from_pretrained({folder!r}, subfolder='scheduler'))",
}
JOB = """
{load}
pipe.set_progress_bar_config(disable=True)
images = pipe({args}, generator=torch.Generator().manual_seed(0), num_inference_steps={steps},
              output_type="np").images
np.save(os.path.join(out, "{name}.npy"), images)
info["{name}"] = {{"class": type(pipe).__module__ + "." + type(pipe).__name__,
                   "our_package_imported": "pipelines" in sys.modules}}
"""
CALLS = {"uncond": "batch_size=2", "cond": "[3, 7], guidance_scale=2.0"}


@pytest.fixture(scope="module")
def fresh_loads(tmp_path_factory, tiny_vqvae):
    """Both pipelines saved with a plain ``save_pretrained``, then loaded and sampled in fresh
    Python processes (three at once, diffusers' loads each alone): their images and classes,
    with the in-process images and the folders."""
    tmp = tmp_path_factory.mktemp("fresh")
    expected, folders = {}, {}
    for kind, pipe in (("uncond", make_uncond(tiny_vqvae)), ("cond", make_cond(tiny_vqvae))):
        expected[kind] = sample(pipe, **({"guidance_scale": 2.0} if kind == "cond" else {}))
        folders[kind] = tmp / kind
        pipe.save_pretrained(folders[kind])
    processes = [
        [("uncond", "ldm"), ("uncond", "ours"), ("cond", "ours")],
        [("uncond", "diffusers")],
        [("cond", "diffusers")],
    ]
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
    runs = []
    for jobs in processes:
        script = "import json, os, sys\nimport numpy as np, torch\nout, info = sys.argv[1], {}\n"
        for kind, loader in jobs:
            cls = (
                "LatentDiffusionPipeline"
                if kind == "uncond"
                else "ClassConditionalLatentDiffusionPipeline"
            )
            load = LOADERS[loader].format(cls=cls, folder=str(folders[kind]))
            script += JOB.format(load=load, args=CALLS[kind], steps=STEPS, name=f"{kind}_{loader}")
        out = tmp / f"process{len(runs)}"
        out.mkdir()
        script += "json.dump(info, open(os.path.join(out, 'info.json'), 'w'))\n"
        runs.append(
            (
                out,
                subprocess.Popen(
                    [sys.executable, "-c", script, str(out)],
                    cwd=tmp,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
            )
        )
    loaded = {}
    for out, run in runs:
        output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, f"loading in a fresh process failed:\n{output}"
        for name, info in json.loads((out / "info.json").read_text()).items():
            loaded[name] = (np.load(out / f"{name}.npy"), info)
    return expected, folders, loaded


def check_folder(folder, module, cls):
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == [module, cls]
    assert {f"{module}.py", "common.py", "vqvae", "unet", "scheduler"} <= set(os.listdir(folder))


def test_unconditional_save_and_load_in_fresh_processes(fresh_loads):
    expected, folders, loaded = fresh_loads
    check_folder(folders["uncond"], "unconditional", "LatentDiffusionPipeline")
    for name in ("uncond_ours", "uncond_diffusers", "uncond_ldm"):
        np.testing.assert_array_equal(loaded[name][0], expected["uncond"], err_msg=name)
    assert loaded["uncond_ours"][1]["class"] == "pipelines.unconditional.LatentDiffusionPipeline"
    assert loaded["uncond_diffusers"][1] == {  # the code saved in the folder, not our package
        "class": "diffusers_modules.local.unconditional.LatentDiffusionPipeline",
        "our_package_imported": False,
    }
    assert loaded["uncond_ldm"][1]["class"].endswith("pipeline_latent_diffusion_uncond.LDMPipeline")


def test_class_conditional_save_and_load_in_fresh_processes(fresh_loads):
    expected, folders, loaded = fresh_loads
    check_folder(folders["cond"], "class_conditional", "ClassConditionalLatentDiffusionPipeline")
    for name in ("cond_ours", "cond_diffusers"):
        np.testing.assert_array_equal(loaded[name][0], expected["cond"], err_msg=name)
    assert (
        loaded["cond_ours"][1]["class"]
        == "pipelines.class_conditional.ClassConditionalLatentDiffusionPipeline"
    )
    assert loaded["cond_diffusers"][1] == {
        "class": "diffusers_modules.local.class_conditional."
        "ClassConditionalLatentDiffusionPipeline",
        "our_package_imported": False,
    }
