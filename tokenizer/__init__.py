"""Stage one: the image tokenizer (quantizers, autoencoder, losses, data, metrics)."""

from .quantizers import build_quantizer

__all__ = ["build_quantizer"]
