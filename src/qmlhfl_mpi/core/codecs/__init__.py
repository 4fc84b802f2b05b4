"""Link codecs: the :class:`~.base.Codec` interface, the built-ins and their registry.

``CODECS`` maps ``quantizer.kind`` names to factories ``f(levels, bucket, **args)``;
built-ins are references imported on first use, exactly like a plug-in
``module:attr`` or ``file.py:attr``.  Adding a codec is one module plus one
``CODECS.register`` line here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..registry import PluginError, Registry
from .base import Codec, StreamKey

__all__ = ["CODECS", "Codec", "StreamKey", "link_codecs", "make_codec"]

CODECS = Registry("codec", "quantizer.kind")
CODECS.register("qsgd", "qmlhfl_mpi.core.codecs.qsgd:qsgd",
                "stochastic unbiased QSGD with quantizer.levels levels per bucket norm (0 levels = float32)")
CODECS.register("none", "qmlhfl_mpi.core.codecs.identity:identity", "float32, no quantization")

DEFAULT_KIND = "qsgd"


def make_codec(levels: int, bucket: int, kind: str = DEFAULT_KIND, **args: Any) -> Codec:
    """The codec ``kind`` (a registered name or a plug-in reference) with its parameters."""
    factory = CODECS.resolve(kind)
    if not callable(factory):
        raise PluginError(f"quantizer.kind {kind!r}: {factory!r} is not callable; a codec plug-in is a factory "
                          "f(levels, bucket, **args) returning a Codec")
    try:
        codec = factory(levels=levels, bucket=bucket, **args)
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the user's factory raises
        raise PluginError(f"quantizer.kind {kind!r} with levels={levels}, bucket={bucket}: {e}") from None
    missing = [m for m in ("encode", "decode_add", "nbytes", "variance") if not callable(getattr(codec, m, None))]
    if missing:
        raise PluginError(f"quantizer.kind {kind!r} returned {codec!r}, which lacks {missing}; subclass "
                          "qmlhfl_mpi.core.codecs.Codec")
    return codec


def link_codecs(levels: Sequence[int], bucket: int, kinds: Sequence[str] = ()) -> list[Codec]:
    """One codec per link: ``kinds[n]`` (default ``qsgd``) with ``levels[n]`` and the shared ``bucket``."""
    if kinds and len(kinds) != len(levels):
        raise ValueError(f"kinds={list(kinds)} and levels={list(levels)}: give one of each per link")
    return [make_codec(s, bucket, kinds[i] if kinds else DEFAULT_KIND) for i, s in enumerate(levels)]
