"""What the two pipelines share: the tokenizer ↔ UNet checks, the latent and image plumbing, and
saving a folder that carries the pipeline's own code, so that diffusers can load it by itself.

This module must not import from this package (no relative imports, no ``tokenizer``): it is
copied, next to the pipeline module that imports it, into every saved folder, and diffusers'
remote-code loader only brings along the files that the pipeline module imports directly."""

import importlib
import inspect
import json
import math
import numbers
import os
import shutil
from collections.abc import Callable, Sequence

import torch
from diffusers import DiffusionPipeline, ModelMixin, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.constants import DIFFUSERS_DYNAMIC_MODULE_NAME
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MODEL_CARD = "README.md"
TRAINING_CONFIG = "training_config.yaml"  # the training configs (scripts' defaults)
# Loading through the installed class uses the installed code of these components, never the
# copy in the folder: class name → module (a string: this file must not import the package).
INSTALLED_COMPONENTS = {"VQTokenizer": "tokenizer.model"}
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class VQLatentPipeline(DiffusionPipeline):
    """Base of the pipelines on a ``VQTokenizer``'s latents (components ``vqvae``, ``unet``,
    ``scheduler``).

    Saving: ``save_pretrained`` writes diffusers' usual folder (model_index.json and one
    subfolder per component) plus, at its root, the source of the pipeline's module and of this
    one, and ``vqvae/model.py``, the tokenizer's code (which ``VQTokenizer.save_pretrained``
    writes). model_index.json names the pipeline ``["<module>", "<Class>"]`` and the tokenizer
    ``["model", "VQTokenizer"]``, as Hub custom pipelines and community components do. So
    ``DiffusionPipeline.from_pretrained(folder or repo, trust_remote_code=True)`` runs the code
    in the folder and needs no package of ours, while ``<Class>.from_pretrained(folder)`` uses
    the installed classes (the pipeline's and ``tokenizer.VQTokenizer``) and runs no code from
    the folder. A pipeline loaded from a folder keeps that folder's model card and training
    configs when saved elsewhere.

    Calling: ``check_inputs``, ``prepare_latents``, ``denoise`` and ``output`` are the steps both
    pipelines' ``__call__`` share (``output_type`` "pil" / "np" / "pt" / "latent",
    ``callback_on_step_end`` with the tensors of ``_callback_tensor_inputs``, as in diffusers).
    """

    _callback_tensor_inputs = ["latents"]
    model_cpu_offload_seq = "unet->vqvae"
    _class_conditional = False  # whether the UNet takes class labels (the subclass says)

    # ModelMixin, not VQTokenizer: this file is saved into the folder and must not import the
    # tokenizer package (the folder carries its own copy, vqvae/model.py)
    def __init__(self, vqvae: ModelMixin, unet: UNet2DModel, scheduler: SchedulerMixin):
        """Register the three components and check that they fit (``check_components``)."""
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        self.check_components(self._class_conditional)

    # ----------------------------------------------------------------- components

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """C×H×W of the latents the UNet denoises."""
        size = self.unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (self.unet.config.in_channels, *size)

    def check_components(self, conditional: bool):
        """ValueError if the tokenizer's latents are not what the UNet denoises, or if the UNet's
        conditioning is not the pipeline's."""
        vqvae, unet = self.vqvae, self.unet
        if vqvae is None or unet is None:  # diffusers may build a pipeline without a component
            return
        v, u = vqvae.config, unet.config
        levels = len(v.ch_mult) - 1
        side = v.resolution // 2**levels
        tokenizer_shape = (v.embed_dim, side, side)
        if self.latent_shape != tokenizer_shape or u.out_channels != u.in_channels:
            raise ValueError(
                f"The tokenizer's latents are {'×'.join(map(str, tokenizer_shape))} (embed_dim="
                f"{v.embed_dim}, resolution {v.resolution} / 2**{levels}) but the UNet takes "
                f"{'×'.join(map(str, self.latent_shape))} latents and predicts {u.out_channels} "
                f"channels (in_channels={u.in_channels}, out_channels={u.out_channels}, "
                f"sample_size={u.sample_size}); they must match."
            )
        embeds, embed_type = u.num_class_embeds, u.class_embed_type
        if conditional and not (embeds is not None and embeds >= 2 and embed_type is None):
            raise ValueError(
                f"{type(self).__name__} needs a class-conditional UNet: UNet2DModel("
                "class_embed_type=None, num_class_embeds=num_classes + 1), the last id being the "
                f"null class; this one has num_class_embeds={embeds}, class_embed_type="
                f"{embed_type!r}. Use LatentDiffusionPipeline for an unconditional UNet."
            )
        if not conditional and embeds is not None:
            raise ValueError(
                f"This UNet is class-conditional (num_class_embeds={embeds}); "
                f"{type(self).__name__} is unconditional: use "
                "ClassConditionalLatentDiffusionPipeline."
            )

    # ----------------------------------------------------------------- sampling steps

    def check_inputs(
        self,
        batch_size: int,
        num_inference_steps,
        eta,
        generator,
        output_type,
        quantize,
        return_dict,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> list[str]:
        """ValueError naming the first argument of ``__call__`` (of those both pipelines take)
        that is not allowed, and saying what is. Returns the names of the tensors to hand to
        ``callback_on_step_end`` (a ``PipelineCallback``'s own ``tensor_inputs``, as diffusers
        does)."""
        limit = getattr(self.scheduler.config, "num_train_timesteps", None) or math.inf
        if not (is_int(num_inference_steps) and 1 <= num_inference_steps <= limit):
            raise ValueError(
                f"num_inference_steps must be an int in [1, {limit}] (the scheduler's "
                f"num_train_timesteps), got {num_inference_steps!r}"
            )
        if not (is_real(eta) and 0 <= eta <= 1):
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM), got {eta!r}")
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(
                "generator must be None, a torch.Generator or a list of one per image, got "
                f"{generator!r}"
            )
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(
                f"generator must be a single generator or a list of one per image: got "
                f"{len(generator)} generators for {batch_size} images"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        for name, value in (("quantize", quantize), ("return_dict", return_dict)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(
                "callback_on_step_end must be None or a function (pipe, step, timestep, "
                f"callback_kwargs) -> dict, got {callback_on_step_end!r}"
            )
        inputs = callback_on_step_end_tensor_inputs
        names = self._callback_tensor_inputs
        if not isinstance(inputs, (list, tuple)) or not all(k in names for k in inputs):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be a list of names in {names}, got "
                f"{inputs!r}"
            )
        return list(inputs)

    def prepare_latents(self, batch_size: int, generator, latents: torch.Tensor | None = None):
        """N(0, 1) noise of shape B×C×H×W (or the given ``latents``) × the scheduler's sigma."""
        shape = (batch_size, *self.latent_shape)
        device, dtype = self._execution_device, self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
            raise ValueError(f"latents must be a tensor of shape {shape}, got {got}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def step_kwargs(self, eta: float, generator) -> dict:
        """``eta`` and ``generator`` for ``scheduler.step``, for the schedulers that take them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

    @property
    def num_timesteps(self) -> int:
        """The number of timesteps of the last (or current) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (in ``callback_on_step_end``) to skip the remaining
        steps: the latents of the last step taken are the output, as in diffusers' pipelines."""
        return self._interrupt

    def denoise(
        self,
        latents: torch.Tensor,
        num_inference_steps: int,
        eta: float,
        generator,
        predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = (),
    ) -> torch.Tensor:
        """The denoising loop: ``scheduler.step`` on ``predict_noise(model_input, t)`` at every
        timestep, then ``callback_on_step_end(self, i, t, {name: tensor})`` with the tensors
        named in ``callback_on_step_end_tensor_inputs``; the latents it returns (under
        "latents") replace the step's, as in diffusers' pipelines."""
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps, self._interrupt = len(timesteps), False
        step_kwargs = self.step_kwargs(eta, generator)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            noise_pred = predict_noise(self.scheduler.scale_model_input(latents, t), t)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                outputs = callback_on_step_end(self, i, t, kwargs)
                if not isinstance(outputs, dict):
                    raise TypeError(
                        "callback_on_step_end must return a dict (of the tensors it replaces, "
                        f"e.g. its callback_kwargs), got {type(outputs).__name__}"
                    )
                latents = outputs.pop("latents", latents)
        return latents

    def output(
        self, latents: torch.Tensor, output_type: str, quantize: bool, return_dict: bool
    ) -> ImagePipelineOutput | tuple:
        """The denoised latents decoded (re-quantized unless ``quantize=False``) into images in
        [0, 1]: a B×3×H×W tensor ("pt"), a B×H×W×3 array ("np"), a list of PIL images ("pil");
        or, for "latent", the latents themselves, not divided by the tokenizer's
        ``scaling_factor`` (as diffusers' pipelines return them: decode them with
        ``vqvae.decode(latents / vqvae.config.scaling_factor)``)."""
        if output_type == "latent":
            images = latents
        else:
            latents = (latents / self.vqvae.config.scaling_factor).to(self.vqvae.dtype)
            images = self.vqvae.decode(latents, force_not_quantize=not quantize).sample
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # ----------------------------------------------------------------- saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """diffusers' ``save_pretrained``, plus the pipeline's code at the root of the folder and,
        for a pipeline loaded from a local folder, that folder's model card and training
        configs (what they describe is what is saved)."""
        os.makedirs(save_directory, exist_ok=True)
        source = inspect.getfile(type(self))
        for file in [source, *get_relative_import_files(source)]:
            shutil.copy(file, save_directory)
        # the folder from_pretrained read (diffusers' from_pretrained records only its argument)
        origin = getattr(self, "_loaded_from", None) or self.config.get("_name_or_path")
        if origin and os.path.isdir(origin) and not os.path.samefile(origin, save_directory):
            for name in (MODEL_CARD, TRAINING_CONFIG):
                if os.path.isfile(os.path.join(origin, name)):
                    shutil.copy(os.path.join(origin, name), save_directory)
        super().save_pretrained(save_directory, **kwargs)

    def to_json_string(self) -> str:
        """model_index.json names the code saved in the folder: ``["<module>", "<Class>"]`` for
        the pipeline and for every component that saves its own code (registered for
        ``AutoModel``, as ``VQTokenizer`` is: ``<component>/<module>.py``, where diffusers'
        custom-component loader looks)."""
        config = json.loads(super().to_json_string())
        for name in [k for k, v in config.items() if isinstance(v, list) and k[0] != "_"]:
            component = getattr(self, name, None)
            if getattr(component, "_auto_class", None):
                config[name] = [module_name(type(component)), type(component).__name__]
        config["_class_name"] = [module_name(type(self)), type(self).__name__]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' ``from_pretrained``; a Hub repository id is read from its snapshot
        (``huggingface_hub.snapshot_download``, whose card and training configs then come along
        when the pipeline is saved): diffusers' own download would resolve the repository's
        pipeline code, and ask for trust_remote_code, although this class runs none of it."""
        folder = pretrained_model_name_or_path
        if not os.path.isdir(folder):
            hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
            folder = snapshot_download(str(folder), **hub)
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        pipe._loaded_from = str(folder)
        return pipe

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Read ``["<module>", "<Class>"]`` as ``"<Class>"``, and the tokenizer as the installed
        ``tokenizer.VQTokenizer`` (in folders of either version): loading through the class
        itself uses the installed code, not the copy in the folder (which would need
        trust_remote_code)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        if not cls.__module__.startswith(f"{DIFFUSERS_DYNAMIC_MODULE_NAME}."):  # not a copy
            for name, value in config.items():
                if isinstance(value, list) and len(value) == 2 and value[1] in INSTALLED_COMPONENTS:
                    config[name] = [INSTALLED_COMPONENTS[value[1]], value[1]]
                    # diffusers resolves such a module only if imported (it imports none that a
                    # folder names); this one is named by this class, not by the folder
                    importlib.import_module(config[name][0])
        return loaded


def module_name(cls: type) -> str:
    """The file a class's code is saved as (without .py), as diffusers' ``auto_map`` names it."""
    return cls.__module__.rsplit(".", 1)[-1]
