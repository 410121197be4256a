"""Class-conditional latent diffusion on a VQ tokenizer's latents, with classifier-free guidance
(Ho & Salimans 2022) by batch doubling, as diffusers' ``DiTPipeline`` does."""

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .common import VQLatentPipeline, check_output_type


class ClassConditionalLatentDiffusionPipeline(VQLatentPipeline):
    r"""
    Pipeline for class-conditional image generation by latent diffusion on a VQ tokenizer's
    latents, with classifier-free guidance. Saving and loading: see [`VQLatentPipeline`].

    Parameters:
        vqvae ([`VQTokenizer`]):
            The stage-one tokenizer; its decoder turns latents into images (re-quantizing them
            first unless `quantize=False`).
        unet ([`UNet2DModel`]):
            A class-conditional UNet denoising the tokenizer's latents: `class_embed_type=None`,
            `num_class_embeds = num_classes + 1`, the extra id `num_classes` being the null
            class (trained by label dropout) used for the unconditional prediction.
        scheduler ([`SchedulerMixin`]):
            The sampling scheduler, e.g. `pipelines.default_scheduler()` (DDIM on LDM's schedule).
    """

    model_cpu_offload_seq = "unet->vqvae"

    # ModelMixin, not VQTokenizer: this file is saved into the folder and must not import the
    # tokenizer package (the folder carries its own copy, vqvae/model.py)
    def __init__(self, vqvae: ModelMixin, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        self.check_components(conditional=True)

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class(self) -> int:
        """The class id of the unconditional prediction (the UNet's last class embedding)."""
        return self.num_classes

    def prepare_class_labels(self, class_labels) -> torch.Tensor:
        """An int, a list of ints or an integer tensor → a 1-D int64 tensor, checked to lie in
        [0, num_classes)."""
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty: pass at least one class label")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            n = self.num_classes
            raise ValueError(
                f"class label {bad[0].item()} is out of range: this model has {n} "
                f"classes, labels must be in [0, {n}) (id {n} is the null class "
                "used by guidance)"
            )
        return labels.to(device=self._execution_device, dtype=torch.long)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        guidance_scale: float = 1.5,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        quantize: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate one image per class label.

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`): class ids in [0, num_classes).
            guidance_scale (`float`): s ≥ 0 in ε = ε(∅) + s·(ε(y) − ε(∅)), ∅ the null class.
                s = 1 is the plain conditional model (one UNet pass, no doubling), s = 0 the
                unconditional one; s > 1 (LDM: 1.5) trades diversity for fidelity.
            num_inference_steps (`int`): denoising steps.
            eta (`float`): DDIM's η (0: deterministic DDIM); ignored by schedulers without it.
            generator (`torch.Generator` or a list of one per image): for the initial noise and
                the noise of stochastic scheduler steps.
            latents (`torch.Tensor`, *optional*): initial N(0, 1) noise, B×C×H×W, instead of
                drawing it.
            output_type (`str`): `"pil"` (list of `PIL.Image`), `"np"` (B×H×W×3 float array) or
                `"pt"` (B×3×H×W float tensor), in [0, 1].
            return_dict (`bool`): return an [`ImagePipelineOutput`] rather than a tuple.
            quantize (`bool`): decode the generated latents through the quantizer (the default)
                or decode them as they are.
        """
        # 1. check inputs
        labels = self.prepare_class_labels(class_labels)
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1: no guidance), got {guidance_scale}")
        check_output_type(output_type)

        # 2. prepare latents (and labels: one UNet pass on [latents, latents] with [y, null])
        latents = self.prepare_latents(len(labels), generator, latents)
        guided = guidance_scale != 1
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])

        # 3. denoising loop
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        step_kwargs = self.step_kwargs(eta, generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            if guided:
                model_input = torch.cat([model_input, model_input])
            noise_pred = self.unet(model_input, t, class_labels=labels).sample
            if guided:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        # 4. decode (re-quantizing unless quantize=False)
        latents = (latents / self.vqvae.config.scaling_factor).to(self.vqvae.dtype)
        images = self.vqvae.decode(latents, force_not_quantize=not quantize).sample

        # 5. post-process
        images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
