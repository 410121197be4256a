"""What the two pipelines share: the tokenizer ↔ UNet checks, the latent and image plumbing, and
saving a folder that carries the pipeline's own code, so that diffusers can load it by itself.

This module must not import from this package (no relative imports): it is copied, next to the
pipeline module that imports it, into every saved folder, and diffusers' remote-code loader only
brings along the files that the pipeline module imports directly."""

import inspect
import json
import os
import shutil

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt")


def check_output_type(output_type: str):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


class VQLatentPipeline(DiffusionPipeline):
    """Base of the pipelines on a ``VQTokenizer``'s latents (components ``vqvae``, ``unet``,
    ``scheduler``).

    Saving: ``save_pretrained`` writes diffusers' usual folder (model_index.json and one
    subfolder per component) plus, at its root, the source of the pipeline's module and of this
    one; model_index.json names the pipeline as ``["<module>", "<Class>"]``, as Hub custom
    pipelines do. So ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` runs
    the code in the folder (which imports the installed ``tokenizer`` package, where the
    ``vqvae`` entry ``["tokenizer.model", "VQTokenizer"]`` then resolves), while
    ``<Class>.from_pretrained(folder)`` uses the installed class and runs no code from the folder.
    This is for local folders: diffusers' Hub download also wants a ``vqvae/<module>.py``.
    """

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

    def prepare_latents(self, batch_size: int, generator, latents: torch.Tensor | None = None):
        """N(0, 1) noise of shape B×C×H×W (or the given ``latents``) × the scheduler's sigma."""
        shape = (batch_size, *self.latent_shape)
        device, dtype = self._execution_device, self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def step_kwargs(self, eta: float, generator) -> dict:
        """``eta`` and ``generator`` for ``scheduler.step``, for the schedulers that take them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}

    def postprocess(self, images: torch.Tensor, output_type: str):
        """Decoded images in [-1, 1] → [0, 1]: B×3×H×W tensor ("pt"), B×H×W×3 array ("np") or
        list of PIL images ("pil")."""
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images

    # ----------------------------------------------------------------- saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """diffusers' ``save_pretrained``, plus the pipeline's code at the root of the folder."""
        os.makedirs(save_directory, exist_ok=True)
        source = inspect.getfile(type(self))
        for file in [source, *get_relative_import_files(source)]:
            shutil.copy(file, save_directory)
        super().save_pretrained(save_directory, **kwargs)

    def to_json_string(self) -> str:
        """model_index.json names the code saved in the folder: ``["<module>", "<Class>"]``."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = [type(self).__module__.rsplit(".", 1)[-1], type(self).__name__]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Read ``["<module>", "<Class>"]`` as ``"<Class>"``: loading through the class itself uses
        it, instead of the copy of its code in the folder (which would need trust_remote_code)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        return loaded
