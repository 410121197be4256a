"""Vector quantizers: ``build_quantizer("vq" | "cvq" | "looc", **options)``.

Every quantizer maps z (B×C×H×W) to a :class:`QuantizerOutput` and has ``decode_indices``.
"""

from __future__ import annotations

import inspect

from .core import Quantizer, QuantizerOutput, perplexity
from .cvq import ANCHORS, ClusteredQuantizer
from .looc import LooCQuantizer
from .search import Search, nearest_code, search_and_anchor
from .vq import VectorQuantizer

QUANTIZERS = {"vq": VectorQuantizer, "cvq": ClusteredQuantizer, "looc": LooCQuantizer}


def quantizer_options(kind: str) -> list[str]:
    """The keyword options ``build_quantizer(kind, ...)`` accepts."""
    names = []
    for cls in QUANTIZERS[kind].__mro__:
        if not issubclass(cls, Quantizer):
            break
        for name in inspect.signature(cls.__init__).parameters:
            if name not in ("self", "options", "common") and name not in names:
                names.append(name)
    return names


def build_quantizer(kind: str, **options) -> Quantizer:
    """Build a quantizer by name. Unknown kinds or options raise a ``ValueError`` that lists what
    is allowed."""
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer kind {kind!r}; choose one of {sorted(QUANTIZERS)}")
    allowed = quantizer_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for quantizer {kind!r}; allowed: {allowed}")
    return QUANTIZERS[kind](**options)


__all__ = [
    "ANCHORS",
    "QUANTIZERS",
    "ClusteredQuantizer",
    "LooCQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "Search",
    "search_and_anchor",
    "build_quantizer",
    "nearest_code",
    "perplexity",
    "quantizer_options",
]
