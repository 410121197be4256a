"""diffusers ``DiffusionPipeline`` subclasses for sampling from a trained model, and evaluation.

``LatentDiffusionPipeline`` (unconditional) and ``ClassConditionalLatentDiffusionPipeline``
(classifier-free guidance) sample latents with a ``UNet2DModel`` and decode them with the
``VQTokenizer``; ``default_scheduler()`` is the sampling scheduler to pair them with."""

from diffusers import DDIMScheduler

from .class_conditional import ClassConditionalLatentDiffusionPipeline
from .unconditional import LatentDiffusionPipeline

__all__ = [
    "ClassConditionalLatentDiffusionPipeline",
    "LatentDiffusionPipeline",
    "default_scheduler",
]


def default_scheduler(num_train_timesteps: int = 1000) -> DDIMScheduler:
    """DDIM sampling on LDM's training schedule ("linear" 0.0015 → 0.0195 in √β, which diffusers
    calls ``scaled_linear``; epsilon prediction), with the settings LDM's DDIM sampler uses: no
    clipping, ᾱ of the final step taken from the schedule (``set_alpha_to_one=False``) and
    timesteps offset by one (``steps_offset=1``)."""
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
