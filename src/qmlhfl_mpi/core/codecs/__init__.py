"""Link codecs: the :class:`~.base.Codec` interface, the built-ins and their registry.

``CODECS`` maps ``quantizer.kind`` names to factories ``f(levels, bucket, **args)``;
built-ins are references imported on first use, exactly like a plug-in
``module:attr`` or ``file.py:attr``.  Adding a codec is one module plus one
``CODECS.register`` line here.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from ..registry import PluginError, Registry
from .base import Codec, StreamKey

__all__ = ["CODECS", "Codec", "StreamKey", "link_codecs", "make_codec"]

CODECS = Registry("codec", "quantizer.kind")
CODECS.register("qsgd", "qmlhfl_mpi.core.codecs.qsgd:qsgd",
                "stochastic unbiased QSGD with quantizer.levels levels per bucket norm (0 levels = float32)")
CODECS.register("none", "qmlhfl_mpi.core.codecs.identity:identity", "float32, no quantization")
CODECS.register("topk", "qmlhfl_mpi.core.codecs.topk:topk",
                "biased: the k = ceil(quantizer.topk_fraction * d) largest-magnitude coordinates, "
                "values float32 and indices bit-packed")
CODECS.register("sign", "qmlhfl_mpi.core.codecs.sign:sign",
                "biased: scaled sign, one bit per coordinate and one float32 scale (mean |x|) per bucket")
CODECS.register("intsum", "qmlhfl_mpi.core.codecs.intsum:intsum",
                "integer codes of quantizer.levels bits that a parent adds up mod 2^b (secure aggregation; link 1, "
                "needs privacy.clip; quantizer.scale, quantizer.rotate)")
CODECS.register("round", "qmlhfl_mpi.core.codecs.rounding:round_nearest",
                "biased: deterministic nearest-level rounding with quantizer.levels levels per bucket norm "
                "(qsgd's wire format)")

DEFAULT_KIND = "qsgd"
DEFAULT_TOPK_FRACTION = 0.01


def _offered(factory: Any, offers: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``offers`` that ``factory``'s signature names (all with ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature (a builtin): offer nothing extra
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offers)
    return {k: v for k, v in offers.items() if k in params}


def make_codec(levels: int, bucket: int | str, kind: str = DEFAULT_KIND, **offers: Any) -> Codec:
    """The codec ``kind`` (a registered name or a plug-in reference) with its parameters.

    ``offers`` are link settings a codec may take (``fraction``: ``quantizer.topk_fraction``;
    ``tensor_sizes``: the model's parameter tensors, for ``bucket: tensor``); each is passed
    only to factories whose signature names it (or takes ``**kwargs``).
    """
    factory = CODECS.resolve(kind)
    if not callable(factory):
        raise PluginError(f"quantizer.kind {kind!r}: {factory!r} is not callable; a codec plug-in is a factory "
                          "f(levels, bucket, **args) returning a Codec")
    try:
        codec = factory(levels=levels, bucket=bucket, **_offered(factory, offers))
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the user's factory raises
        raise PluginError(f"quantizer.kind {kind!r} with levels={levels}, bucket={bucket}: {e}") from None
    missing = [m for m in ("encode", "decode_add", "nbytes", "variance") if not callable(getattr(codec, m, None))]
    if missing:
        raise PluginError(f"quantizer.kind {kind!r} returned {codec!r}, which lacks {missing}; subclass "
                          "qmlhfl_mpi.core.codecs.Codec")
    return codec


def link_codecs(levels: Sequence[int], bucket: int | str, kinds: Sequence[str] = (),
                fractions: Sequence[float] = (), tensor_sizes: Sequence[int] | None = None,
                scales: Sequence[float] = (), rotate: Sequence[bool] = ()) -> list[Codec]:
    """One codec per link: ``kinds[n]`` (default ``qsgd``) with ``levels[n]``, the shared ``bucket``,
    ``fractions[n]`` (``quantizer.topk_fraction``, default 0.01), the model's ``tensor_sizes`` and, for the
    codecs that take them, ``scales[n]`` and ``rotate[n]`` (``intsum``)."""
    for name, vals in (("kinds", kinds), ("fractions", fractions)):
        if vals and len(vals) != len(levels):
            raise ValueError(f"{name}={list(vals)} and levels={list(levels)}: give one of each per link")
    sizes = tuple(int(n) for n in tensor_sizes) if tensor_sizes is not None else None
    return [make_codec(s, bucket, kinds[i] if kinds else DEFAULT_KIND,
                       fraction=fractions[i] if fractions else DEFAULT_TOPK_FRACTION, tensor_sizes=sizes,
                       scale=scales[i] if scales else 1.0, rotate=bool(rotate[i]) if rotate else False)
            for i, s in enumerate(levels)]
