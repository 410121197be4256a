"""Vector quantizers: ``build_quantizer(kind, **options)`` with ``kind`` one of ``QUANTIZERS``:
"vq", "cvq", "looc" (explicit codebooks kept alive by the CVQ update), and the field's
collapse-free quantizers "fsq", "lfq" (implicit codebooks), "simvq" and "ibq".

Every quantizer maps z (B×C×H×W) to a :class:`QuantizerOutput` and has ``decode_indices``.
"""

from __future__ import annotations

import inspect
import math

from .core import CodebookQuantizer, Quantizer, QuantizerOutput, perplexity
from .cvq import ANCHORS, ClusteredQuantizer
from .fsq import FSQQuantizer
from .ibq import IBQQuantizer
from .lfq import LFQQuantizer
from .looc import LooCQuantizer
from .search import Search, nearest_code, search_and_anchor
from .simvq import SimVQQuantizer
from .vq import VectorQuantizer

QUANTIZERS = {
    "vq": VectorQuantizer,
    "cvq": ClusteredQuantizer,
    "looc": LooCQuantizer,
    "fsq": FSQQuantizer,
    "lfq": LFQQuantizer,
    "simvq": SimVQQuantizer,
    "ibq": IBQQuantizer,
}


def quantizer_options(kind: str) -> list[str]:
    """The keyword options ``build_quantizer(kind, ...)`` accepts: the class's own, and its
    parent's as long as a class passes its other keywords on (``**common``)."""
    names = []
    for cls in QUANTIZERS[kind].__mro__:
        parameters = inspect.signature(cls.__init__).parameters.values()
        names += [
            p.name
            for p in parameters
            if p.name != "self" and p.kind != p.VAR_KEYWORD and p.name not in names
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
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
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"quantizer option {name} = {value!r} must be a finite number")
    return QUANTIZERS[kind](**options)


__all__ = [
    "ANCHORS",
    "QUANTIZERS",
    "ClusteredQuantizer",
    "CodebookQuantizer",
    "FSQQuantizer",
    "IBQQuantizer",
    "LFQQuantizer",
    "LooCQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "SimVQQuantizer",
    "VectorQuantizer",
    "Search",
    "search_and_anchor",
    "build_quantizer",
    "nearest_code",
    "perplexity",
    "quantizer_options",
]
