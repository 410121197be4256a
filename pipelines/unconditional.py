"""Unconditional latent diffusion on a VQ tokenizer's latents (LDM, Rombach et al. 2022)."""

from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .common import VQLatentPipeline, is_int


class LatentDiffusionPipeline(VQLatentPipeline):
    r"""
    Pipeline for unconditional image generation by latent diffusion on a VQ tokenizer's latents.

    It computes what diffusers' [`LDMPipeline`] computes with the same components (which are named
    the same, so either pipeline can be built from a saved folder's subfolders), and adds
    `latents`, `quantize`, `output_type="pt"` and `"latent"`, `callback_on_step_end`, a generator
    for stochastic scheduler steps, and input checks. Saving and loading: see [`VQLatentPipeline`].

    Parameters:
        vqvae ([`VQTokenizer`]):
            The stage-one tokenizer; its decoder turns latents into images (re-quantizing them
            first unless `quantize=False`).
        unet ([`UNet2DModel`]):
            An unconditional UNet denoising the tokenizer's latents: `in_channels = out_channels =
            vqvae.config.embed_dim` and `sample_size = resolution / 2**(len(ch_mult) - 1)`.
        scheduler ([`SchedulerMixin`]):
            The sampling scheduler, e.g. `pipelines.default_scheduler()` (DDIM on LDM's schedule).
    """

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        quantize: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers'
        **kwargs,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate `batch_size` images.

        Args:
            batch_size (`int`): number of images.
            num_inference_steps (`int`): denoising steps, in [1, the scheduler's
                `num_train_timesteps`].
            eta (`float`): DDIM's η in [0, 1] (0: deterministic DDIM); ignored by schedulers
                without it.
            generator (`torch.Generator` or a list of one per image): for the initial noise and
                the noise of stochastic scheduler steps.
            latents (`torch.Tensor`, *optional*): initial N(0, 1) noise, B×C×H×W, instead of
                drawing it.
            output_type (`str`): `"pil"` (list of `PIL.Image`), `"np"` (B×H×W×3 float array) or
                `"pt"` (B×3×H×W float tensor), in [0, 1]; or `"latent"`: the denoised latents
                (B×C×H×W, not decoded, not divided by the tokenizer's `scaling_factor`).
            return_dict (`bool`): return an [`ImagePipelineOutput`] rather than a tuple.
            quantize (`bool`): decode the generated latents through the quantizer (the default,
                as `LDMPipeline` does) or decode them as they are.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`,
                *optional*): called after every denoising step as `callback_on_step_end(self,
                step, timestep, callback_kwargs)`, `callback_kwargs` holding the tensors named in
                `callback_on_step_end_tensor_inputs`; it returns a dict, whose `"latents"`, if
                any, replace the step's. Setting `self._interrupt = True` skips the remaining
                steps.
            callback_on_step_end_tensor_inputs (`list[str]`): names among
                `self._callback_tensor_inputs` (`["latents"]`).
        """
        # 1. check inputs
        if {"class_labels", "guidance_scale"} & kwargs.keys():
            raise TypeError(
                f"{type(self).__name__} is unconditional: it takes no class_labels or "
                "guidance_scale; use ClassConditionalLatentDiffusionPipeline with a "
                "class-conditional UNet."
            )
        if kwargs:
            raise TypeError(f"{type(self).__name__}() got unexpected arguments {sorted(kwargs)}")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(
                f"batch_size must be a positive int, got {batch_size!r} (this "
                "pipeline is unconditional: class labels go to "
                "ClassConditionalLatentDiffusionPipeline)"
            )
        tensor_inputs = self.check_inputs(
            batch_size,
            num_inference_steps,
            eta,
            generator,
            output_type,
            quantize,
            return_dict,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 2. prepare latents
        latents = self.prepare_latents(batch_size, generator, latents)

        # 3. denoising loop
        def predict_noise(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(model_input, t).sample

        latents = self.denoise(
            latents,
            num_inference_steps,
            eta,
            generator,
            predict_noise,
            callback_on_step_end,
            tensor_inputs,
        )

        # 4. decode (re-quantizing unless quantize=False) and post-process
        return self.output(latents, output_type, quantize, return_dict)
