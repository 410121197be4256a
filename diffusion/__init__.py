"""Stage two: latent diffusion on the frozen tokenizer's latents (latent cache, UNet, training)."""
