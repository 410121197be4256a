"""Class-conditional latent diffusion on a VQ tokenizer's latents, with classifier-free guidance
(Ho & Salimans 2022) by batch doubling, as diffusers' ``DiTPipeline`` does."""

import difflib
from collections.abc import Callable
from typing import Union

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .common import VQLatentPipeline, is_real


class ClassConditionalLatentDiffusionPipeline(VQLatentPipeline):
    r"""
    Pipeline for class-conditional image generation by latent diffusion on a VQ tokenizer's
    latents, with classifier-free guidance. Saving and loading: see [`VQLatentPipeline`].

    Class names, as in diffusers' [`DiTPipeline`]: `id2label` (saved in model_index.json) names
    the classes, `labels` maps every name to its id and `get_label_ids(names)` gives the ids to
    pass as `class_labels`.

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
        id2label (`dict[int, str]`, *optional*):
            Class id → class name, a name possibly listing comma-separated synonyms (as
            ImageNet's "tench, Tinca tinca"); ids in [0, num_classes). Saved with the pipeline.
    """

    _class_conditional = True

    # the components as in VQLatentPipeline (this signature is what diffusers loads), and id2label
    def __init__(
        self,
        vqvae: ModelMixin,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        # Union, not int | str: diffusers' load-time type check reads only typing.Union in a dict
        # (and a loaded id2label has model_index.json's string keys)
        id2label: dict[Union[int, str], str] | None = None,
    ):
        super().__init__(vqvae, unet, scheduler)
        self.register_to_config(id2label=self.check_id2label(id2label))

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @property
    def null_class(self) -> int:
        """The class id of the unconditional prediction (the UNet's last class embedding)."""
        return self.num_classes

    # ----------------------------------------------------------------- class names

    def check_id2label(self, id2label) -> dict[str, str] | None:
        """``id2label`` as saved in model_index.json: ids as strings (JSON's keys), in order;
        ValueError unless it maps ids in [0, num_classes) to non-empty strings."""
        if id2label is None:
            return None
        n = self.num_classes if self.unet is not None else None
        if not isinstance(id2label, dict):
            raise ValueError(f"id2label must be a dict class id → name, got {id2label!r}")
        names = {}
        for key, name in id2label.items():
            if not (str(key).isdecimal() and (n is None or int(key) < n)):
                raise ValueError(
                    f"id2label: {key!r} is no class id of this model: ids are ints in "
                    f"[0, {n}) (or their strings, as JSON writes them)"
                )
            if not (isinstance(name, str) and name.strip(" ,")):
                raise ValueError(
                    f"id2label[{key!r}] must be a class name (comma-separated synonyms allowed), "
                    f"got {name!r}"
                )
            names[int(key)] = name
        return {str(i): names[i] for i in sorted(names)}

    @property
    def labels(self) -> dict[str, int]:
        """Class name → class id, from ``id2label`` (``config.id2label``), each of whose
        comma-separated synonyms is a name, sorted by name (as ``DiTPipeline.labels``;
        a name of two classes goes to the higher id, as there); {} without ``id2label``."""
        labels = {}
        for key, value in (self.config.get("id2label") or {}).items():
            for name in value.split(","):
                if name.strip():
                    labels[name.strip()] = int(key)
        return dict(sorted(labels.items()))

    def get_label_ids(self, label_names: str | list[str]) -> list[int]:
        """The class ids of class names (any of ``labels``), as ``DiTPipeline.get_label_ids``:
        ``pipe(pipe.get_label_ids(["tench", "goldfish"]))``. ValueError naming the unknown names
        and some known ones."""
        names = [label_names] if isinstance(label_names, str) else list(label_names)
        labels = self.labels
        unknown = [name for name in names if name not in labels]
        if unknown and not labels:
            raise ValueError(
                f"unknown class names {unknown}: this pipeline has no class names (id2label is "
                f"None); pass class ids in [0, {self.num_classes})"
            )
        if unknown:
            close = {m for name in unknown for m in difflib.get_close_matches(name, labels, 3)}
            raise ValueError(
                f"unknown class names {unknown}; known names include "
                f"{sorted(close) or list(labels)[:8]} ({len(labels)} names of "
                f"{self.num_classes} classes: see pipe.labels)"
            )
        return [labels[name] for name in names]

    # ----------------------------------------------------------------- sampling

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
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers'
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate one image per class label.

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`): class ids in [0, num_classes);
                `get_label_ids` gives them for class names.
            guidance_scale (`float`): s ≥ 0 in ε = ε(∅) + s·(ε(y) − ε(∅)), ∅ the null class.
                s = 1 is the plain conditional model (one UNet pass, no doubling), s = 0 the
                unconditional one; s > 1 (LDM: 1.5) trades diversity for fidelity.
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
            quantize (`bool`): decode the generated latents through the quantizer (the default)
                or decode them as they are.
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
        labels = self.prepare_class_labels(class_labels)
        if not (is_real(guidance_scale) and guidance_scale >= 0):
            raise ValueError(
                f"guidance_scale must be a number >= 0 (1: no guidance), got {guidance_scale!r}"
            )
        tensor_inputs = self.check_inputs(
            len(labels),
            num_inference_steps,
            eta,
            generator,
            output_type,
            quantize,
            return_dict,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 2. prepare latents (and labels: one UNet pass on [latents, latents] with [y, null])
        latents = self.prepare_latents(len(labels), generator, latents)
        guided = guidance_scale != 1
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])

        # 3. denoising loop
        def predict_noise(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.unet(model_input, t, class_labels=labels).sample
            model_input = torch.cat([model_input, model_input])
            cond, uncond = self.unet(model_input, t, class_labels=labels).sample.chunk(2)
            return uncond + guidance_scale * (cond - uncond)

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
