"""diffusers ``DiffusionPipeline`` subclasses for sampling from a trained model, and evaluation.

``LatentDiffusionPipeline`` (unconditional) and ``ClassConditionalLatentDiffusionPipeline``
(classifier-free guidance) sample latents with a ``UNet2DModel`` and decode them with the
``VQTokenizer``; ``default_scheduler()`` is the sampling scheduler to pair them with, on the
noise schedule ``NOISE_SCHEDULE`` that stage two trains on
(``diffusion.unet.training_scheduler``)."""

from types import MappingProxyType

from diffusers import DDIMScheduler

from .class_conditional import ClassConditionalLatentDiffusionPipeline
from .unconditional import LatentDiffusionPipeline

__all__ = [
    "NOISE_SCHEDULE",
    "ClassConditionalLatentDiffusionPipeline",
    "LatentDiffusionPipeline",
    "default_scheduler",
]

# LDM's noise schedule, the one fact that training (DDPM) and sampling (DDIM) share: 1000 steps,
# "linear" 0.0015 → 0.0195 in √β (diffusers' ``scaled_linear``), epsilon prediction, no clipping
NOISE_SCHEDULE = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.0015,
        "beta_end": 0.0195,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
    }
)


def default_scheduler(
    num_train_timesteps: int = NOISE_SCHEDULE["num_train_timesteps"],
) -> DDIMScheduler:
    """DDIM sampling on the training schedule ``NOISE_SCHEDULE``, with the settings LDM's DDIM
    sampler uses: no clipping, ᾱ of the final step taken from the schedule
    (``set_alpha_to_one=False``) and timesteps offset by one (``steps_offset=1``)."""
    return DDIMScheduler(
        **{**NOISE_SCHEDULE, "num_train_timesteps": num_train_timesteps},
        set_alpha_to_one=False,
        steps_offset=1,
    )
