"""Stage one: the image tokenizer (quantizers, autoencoder, losses, data, metrics)."""

from .model import VQTokenizer
from .quantizers import build_quantizer

__all__ = ["VQTokenizer", "build_quantizer"]
