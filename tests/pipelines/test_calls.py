"""The pipelines called the diffusers way: ``output_type="latent"``, ``callback_on_step_end`` (with
``callback_on_step_end_tensor_inputs``, ``PipelineCallback``, ``_interrupt``), and every argument
checked before anything runs, with a message naming it and what is allowed."""

import math
import re

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from pipelines import ClassConditionalLatentDiffusionPipeline
from tests.conftest import ALLOWED
from tests.pipelines.test_pipelines import STEPS, make_cond, make_uncond, sample, seed


@pytest.fixture(params=["uncond", "cond"])
def pipe(request, tiny_tokenizer):
    """Each pipeline (tiny, latent scale 0.7) in turn."""
    vqvae = lambda **overrides: tiny_tokenizer(**{"scaling_factor": 0.7, **overrides}).eval()
    return (make_uncond if request.param == "uncond" else make_cond)(vqvae)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """What the pipelines decode ``output_type="latent"``'s latents into, written out."""
    latents = latents / pipe.vqvae.config.scaling_factor
    images = pipe.vqvae.decode(latents, force_not_quantize=not quantize).sample
    return (images / 2 + 0.5).clamp(0, 1)


class Recorder:
    """A callback recording (step, timestep, latents) and returning its ``callback_kwargs``;
    ``replace`` maps steps to latents it returns instead, ``stop_at`` interrupts."""

    def __init__(self, replace=None, stop_at=None):
        self.calls, self.replace, self.stop_at = [], replace or {}, stop_at

    def __call__(self, pipe, step, timestep, callback_kwargs):
        assert list(callback_kwargs) == ["latents"]
        self.calls.append((step, int(timestep), callback_kwargs["latents"].clone()))
        if step == self.stop_at:
            pipe._interrupt = True
        if step in self.replace:
            return {"latents": self.replace[step]}
        return callback_kwargs


# ------------------------------------------------------------------------------ output_type


def test_latent_output_is_what_decoding_starts_from(pipe):
    latents = sample(pipe, output_type="latent")
    assert isinstance(latents, torch.Tensor) and latents.shape == (2, 4, 8, 8)
    # not divided by the latent scale (diffusers' "latent"): decoding divides by it
    assert torch.equal(decode(pipe, latents), sample(pipe, output_type="pt"))
    unquantized = sample(pipe, output_type="pt", quantize=False)
    assert torch.equal(decode(pipe, latents, quantize=False), unquantized)
    assert not torch.allclose(decode(pipe, latents * 0.7, quantize=False), unquantized)


# ------------------------------------------------------------------------------ callbacks


def test_callback_sees_every_step_and_changes_nothing_by_itself(pipe):
    recorder = Recorder()
    latents = sample(pipe, output_type="latent", callback_on_step_end=recorder)
    assert [step for step, _, _ in recorder.calls] == list(range(STEPS))
    assert [t for _, t, _ in recorder.calls] == pipe.scheduler.timesteps.tolist()
    assert pipe.num_timesteps == STEPS
    assert torch.equal(recorder.calls[-1][2], latents)  # the last step's latents are the output
    assert torch.equal(latents, sample(pipe, output_type="latent"))
    assert np.array_equal(sample(pipe, callback_on_step_end=Recorder()), sample(pipe))


def test_callback_replaces_the_latents(pipe):
    last = torch.full((2, 4, 8, 8), 0.5)
    latents = sample(pipe, output_type="latent", callback_on_step_end=Recorder({STEPS - 1: last}))
    assert torch.equal(latents, last)
    images = sample(pipe, output_type="pt", callback_on_step_end=Recorder({STEPS - 1: last}))
    assert torch.equal(images, decode(pipe, last))
    # replaced early, the later steps start from the replacement
    recorder = Recorder({0: torch.zeros(2, 4, 8, 8)})
    changed = sample(pipe, output_type="latent", callback_on_step_end=recorder)
    assert not torch.allclose(changed, sample(pipe, output_type="latent"))
    assert torch.equal(changed, recorder.calls[-1][2])


def test_interrupt_skips_the_remaining_steps(pipe):
    recorder = Recorder(stop_at=1)
    latents = sample(pipe, output_type="latent", callback_on_step_end=recorder)
    assert [step for step, _, _ in recorder.calls] == [0, 1]
    assert torch.equal(latents, recorder.calls[1][2])
    assert pipe.interrupt and pipe.num_timesteps == STEPS
    full = Recorder()  # the next call starts afresh
    assert not torch.equal(sample(pipe, output_type="latent", callback_on_step_end=full), latents)
    assert len(full.calls) == STEPS and not pipe.interrupt


class Halve(PipelineCallback):
    """A diffusers ``PipelineCallback``: its own ``tensor_inputs`` are handed to it."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"] / 2}


class Embeds(PipelineCallback):
    tensor_inputs = ["prompt_embeds"]  # Stable Diffusion's; not these pipelines'


def test_diffusers_pipeline_callbacks(pipe):
    halved = sample(pipe, output_type="latent", callback_on_step_end=Halve())
    assert not torch.allclose(halved, sample(pipe, output_type="latent"))
    twice = MultiPipelineCallbacks([Halve(), Halve()])
    quartered = sample(pipe, output_type="latent", callback_on_step_end=twice)
    assert not torch.allclose(quartered, halved)
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs.*\['latents'\]"):
        sample(pipe, callback_on_step_end=Embeds())


def test_a_callback_must_return_a_dict(pipe):
    with pytest.raises(TypeError, match="callback_on_step_end must return a dict.*NoneType"):
        sample(pipe, callback_on_step_end=lambda pipe, step, t, kwargs: None)


# ------------------------------------------------------------------------------ argument checks

REFUSED = [  # (arguments, what the message must say)
    ({"num_inference_steps": 0}, r"num_inference_steps .*\[1, 1000\].* got 0"),
    ({"num_inference_steps": -3}, r"num_inference_steps .* got -3"),
    ({"num_inference_steps": 2.5}, r"num_inference_steps must be an int .* got 2\.5"),
    ({"num_inference_steps": True}, r"num_inference_steps .* got True"),
    ({"num_inference_steps": "4"}, r"num_inference_steps .* got '4'"),
    ({"num_inference_steps": 1001}, r"num_inference_steps .*num_train_timesteps.* got 1001"),
    ({"eta": -0.1}, r"eta .*\[0, 1\].* got -0\.1"),
    ({"eta": 1.5}, r"eta .*\[0, 1\].* got 1\.5"),
    ({"eta": math.nan}, r"eta .* got nan"),
    ({"eta": "0"}, r"eta must be a number .* got '0'"),
    ({"generator": [seed(0)]}, r"generator must .* one per image: got 1 generators for 2 images"),
    (
        {"generator": [seed(0), seed(1), seed(2)]},
        r"generator must .* got 3 generators for 2 images",
    ),
    ({"generator": 0}, r"generator must be None, a torch\.Generator or a list"),
    ({"generator": [seed(0), 1]}, r"generator must be None"),
    ({"output_type": "latents"}, r"output_type must be one of .*'latent'.* got 'latents'"),
    ({"output_type": None}, r"output_type must be one of .* got None"),
    ({"quantize": "yes"}, r"quantize must be True or False, got 'yes'"),
    ({"return_dict": None}, r"return_dict must be True or False, got None"),
    ({"callback_on_step_end": 3}, r"callback_on_step_end must be None or a function"),
    ({"callback_on_step_end_tensor_inputs": ["noise"]}, r"tensor_inputs .*\['latents'\].*noise"),
    ({"callback_on_step_end_tensor_inputs": "latents"}, r"tensor_inputs must be a list of names"),
    ({"latents": np.zeros((2, 4, 8, 8))}, r"latents must be a tensor of shape \(2, 4, 8, 8\)"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, r"latents .*\(2, 4, 8, 8\), got \(1, 4, 8, 8\)"),
]
UNCONDITIONAL = [
    ({"batch_size": 0}, r"batch_size must be a positive int, got 0"),
    ({"batch_size": 2.0}, r"batch_size must be a positive int, got 2\.0"),
]
CONDITIONAL = [
    ({"guidance_scale": -1.0}, r"guidance_scale must be a number >= 0 .* got -1\.0"),
    ({"guidance_scale": math.inf}, r"guidance_scale .* got inf"),
    ({"guidance_scale": "2"}, r"guidance_scale .* got '2'"),
]


def refused(pipe, arguments, message):
    """The call is refused before the UNet runs, in one line matching ``message`` and saying
    what is allowed."""
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    if isinstance(pipe, ClassConditionalLatentDiffusionPipeline):
        call = lambda: pipe([3, 7], **{"num_inference_steps": 2, **arguments})
    else:
        call = lambda: pipe(**{"batch_size": 2, "num_inference_steps": 2, **arguments})
    with pytest.raises(ValueError, match=message) as error:
        call()
    hook.remove()
    text = str(error.value)
    assert calls == [] and "\n" not in text and re.search(ALLOWED, text), text


@pytest.mark.parametrize("arguments, message", REFUSED, ids=lambda v: str(v)[:40])
def test_every_argument_is_checked(pipe, arguments, message):
    refused(pipe, arguments, message)


@pytest.mark.parametrize(
    "kind, arguments, message",
    [("uncond", *case) for case in UNCONDITIONAL] + [("cond", *case) for case in CONDITIONAL],
    ids=lambda v: str(v)[:40],
)
def test_pipeline_specific_arguments_are_checked(kind, arguments, message, tiny_tokenizer):
    vqvae = lambda **overrides: tiny_tokenizer(**{"scaling_factor": 0.7, **overrides}).eval()
    refused((make_uncond if kind == "uncond" else make_cond)(vqvae), arguments, message)


def test_allowed_edge_values_run(pipe):
    for arguments in ({"num_inference_steps": 1}, {"eta": 1}, {"eta": np.float32(0.5)}):
        assert sample(pipe, **arguments).shape == (2, 16, 16, 3)
    assert sample(pipe, num_inference_steps=np.int64(2), generator=[seed(0), seed(1)]).shape[0] == 2
