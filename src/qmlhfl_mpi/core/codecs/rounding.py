"""``round``: deterministic nearest-level rounding on qsgd's grid, biased (pure numpy).

The wire format and the decoder are exactly those of ``qsgd`` (:mod:`.qsgd`:
``nb`` float32 bucket norms, then ``d`` codes ``sign | level << 1`` of
``w = 1 + ceil(log2(s + 1))`` bits, so ``nbytes = 4 * nb + ceil(d * w / 8)``),
and the norm is qsgd's float32 norm (the eight-lane sum of squares).  Only
the level differs: no random draw, the nearest level (halves rounded up),

    y_i = |x_i| * float32(s / norm_k)     (float32, as qsgd computes it)
    level_i = min(floor(y_i + 1/2), s)     (the floor computed exactly, in float64)

with ``level_i = 0`` for a bucket whose norm is 0, inf or NaN (the latter two
decode to NaN, as in qsgd).  ``bucket: tensor`` works as for qsgd (:mod:`.tensor`).

Error: ``|Q(x)_i - x_i| <= min(norm_k / (2s), |x_i|)`` (up to float32 rounding), so
``||Q(x) - x||^2 <= min(1, B / (4 s^2)) ||x||^2`` with ``B`` the bucket length,
both bounds attained (one value: exact; ``B > 4 s^2`` equal values: all round to
0).  :meth:`RoundCodec.variance` returns that deterministic factor; the codec is
biased, so the convergence bound does not apply.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Codec, StreamKey
from .bitpack import pack
from .qsgd import QSGDCodec, _as_f32, _sumsq8_reference
from .tensor import TENSOR, TensorBucketCodec, parse_bucket

__all__ = ["RoundCodec", "round_levels", "round_nearest"]


def round_levels(xb: np.ndarray, norms: np.ndarray, s: int) -> np.ndarray:
    """The level of every value of the buckets ``xb`` (rows) with float32 ``norms``: the
    nearest of ``0 .. s`` to ``|x| * float32(s / norm)``, halves up (see the module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = np.where(norms > 0, np.float32(s) / norms, np.float32(0)).astype(np.float32)
        y = (np.abs(xb) * scale[:, None]).astype(np.float64)  # float32 product, exact in float64
        level = np.floor(y + 0.5)
    level[np.isnan(level)] = 0  # inf/nan inputs (their norm is inf/nan and decodes to nan)
    return np.minimum(level, s).astype(np.uint32)


@dataclass(frozen=True)
class RoundCodec(QSGDCodec):
    """Nearest-level rounding with ``levels`` levels per bucket norm (qsgd's wire format)."""

    biased = True

    @property
    def name(self) -> str:
        return f"round(s={self.levels}, bucket={self.bucket})"

    def variance(self, d: int) -> float:
        """The deterministic factor ``min(1, B / (4 s^2))`` (``B`` the bucket length; 0 for ``d = 0``)."""
        if d == 0:
            return 0.0
        _, blen = self._blocks(d)
        return min(1.0, blen / (4.0 * self.levels**2))

    def norm_factor(self, d: int) -> float:
        """``1 + sqrt(B) / (2 s)``: each coordinate moves by at most half a level."""
        return 1.0 + math.sqrt(self._blocks(d)[1]) / (2 * self.levels)

    def encode(self, child: np.ndarray, parent: np.ndarray, key: StreamKey) -> np.ndarray:
        """The message for ``child - parent`` (float32); deterministic, ``key`` is unused."""
        child, parent = _as_f32(child), _as_f32(parent)
        if child.shape != parent.shape:
            raise ValueError(f"child {child.shape} and parent {parent.shape} differ in shape")
        x = child - parent
        d = x.size
        out = np.empty(self.nbytes(d), dtype=np.uint8)
        if d == 0:
            return out
        nb, blen = self._blocks(d)
        if nb * blen == d:
            xb = x.reshape(nb, blen)
        else:
            flat = np.zeros(nb * blen, dtype=np.float32)
            flat[:d] = x
            xb = flat.reshape(nb, blen)
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.sqrt(_sumsq8_reference(xb))  # qsgd's norm, bit for bit
        codes = round_levels(xb, norms, self.levels).reshape(-1)[:d]
        codes = (codes << np.uint32(1)) | (x < 0).astype(np.uint32)  # the sign bit: x < 0 (zeros and nan: 0)
        out[: 4 * nb] = norms.astype("<f4").view(np.uint8)
        out[4 * nb :] = pack(codes.astype(np.uint16 if self.width > 8 else np.uint8), self.width)
        return out

    def encode_add(self, child: np.ndarray, parent: np.ndarray, key: StreamKey, a: np.float32,
                   acc: np.ndarray) -> None:
        """``decode_add(encode(child, parent, key), a, acc)`` (literally)."""
        self.decode_add(self.encode(child, parent, key), a, acc)

    def encode_words(self, child: np.ndarray, parent: np.ndarray, k0: int, k1: int) -> np.ndarray:
        """:meth:`encode` (the stream words are unused)."""
        return self.encode(child, parent, ())

    def encode_add_words(self, child: np.ndarray, parent: np.ndarray, k0: int, k1: int, a: np.float32,
                         acc: np.ndarray) -> None:
        """:meth:`encode_add` (the stream words are unused)."""
        self.encode_add(child, parent, (), a, acc)

    def encode_vector(self, x: np.ndarray, gen: np.random.Generator | None = None) -> np.ndarray:
        """The message for ``x`` (``gen`` unused: deterministic)."""
        x = _as_f32(x)
        return self.encode(x, np.zeros_like(x), ())


def round_nearest(levels: int, bucket: int | str, tensor_sizes: Sequence[int] | None = None) -> Codec:
    """Factory of the ``round`` codec (biased): ``levels`` levels (1 .. 32767) per bucket norm.

    ``bucket``: values per norm (0: one global norm) or ``'tensor'`` with the model's
    ``tensor_sizes`` (one norm per parameter tensor; ``tensor_sizes`` is ignored otherwise).
    """
    if isinstance(levels, (int, np.integer)) and not isinstance(levels, bool) and levels == 0:
        raise ValueError("codec 'round' with levels=0: rounding to 0 levels means nothing; for float32 "
                         "messages use quantizer.kind 'none' (or 'qsgd' with 0 levels); expected 1 <= levels <= 32767")
    blen, sizes = parse_bucket(bucket, tensor_sizes, "round")
    if sizes is None:
        return RoundCodec(levels=levels, bucket=blen)
    return TensorBucketCodec(RoundCodec(levels=levels, bucket=0), sizes, f"round(s={levels}, bucket={TENSOR})")
