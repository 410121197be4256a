"""Unconditional latent diffusion on a VQ tokenizer's latents (LDM, Rombach et al. 2022)."""

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .common import VQLatentPipeline, check_output_type


class LatentDiffusionPipeline(VQLatentPipeline):
    r"""
    Pipeline for unconditional image generation by latent diffusion on a VQ tokenizer's latents.

    It computes what diffusers' [`LDMPipeline`] computes with the same components (which are named
    the same, so either pipeline can be built from a saved folder's subfolders), and adds
    `latents`, `quantize`, `output_type="pt"`, a generator for stochastic scheduler steps, and
    input checks. Saving and loading: see [`VQLatentPipeline`].

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

    model_cpu_offload_seq = "unet->vqvae"

    # ModelMixin, not VQTokenizer: this file is saved into the folder and must not import the
    # tokenizer package (the folder carries its own copy, vqvae/model.py)
    def __init__(self, vqvae: ModelMixin, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        self.check_components(conditional=False)

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
        **kwargs,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate `batch_size` images.

        Args:
            batch_size (`int`): number of images.
            num_inference_steps (`int`): denoising steps.
            eta (`float`): DDIM's η (0: deterministic DDIM); ignored by schedulers without it.
            generator (`torch.Generator` or a list of one per image): for the initial noise and
                the noise of stochastic scheduler steps.
            latents (`torch.Tensor`, *optional*): initial N(0, 1) noise, B×C×H×W, instead of
                drawing it.
            output_type (`str`): `"pil"` (list of `PIL.Image`), `"np"` (B×H×W×3 float array) or
                `"pt"` (B×3×H×W float tensor), in [0, 1].
            return_dict (`bool`): return an [`ImagePipelineOutput`] rather than a tuple.
            quantize (`bool`): decode the generated latents through the quantizer (the default,
                as `LDMPipeline` does) or decode them as they are.
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"batch_size must be a positive int, got {batch_size!r} (this "
                "pipeline is unconditional: class labels go to "
                "ClassConditionalLatentDiffusionPipeline)"
            )
        check_output_type(output_type)

        # 2. prepare latents
        latents = self.prepare_latents(batch_size, generator, latents)

        # 3. denoising loop
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        step_kwargs = self.step_kwargs(eta, generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            noise_pred = self.unet(model_input, t).sample
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        # 4. decode (re-quantizing unless quantize=False)
        latents = (latents / self.vqvae.config.scaling_factor).to(self.vqvae.dtype)
        images = self.vqvae.decode(latents, force_not_quantize=not quantize).sample

        # 5. post-process
        images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
