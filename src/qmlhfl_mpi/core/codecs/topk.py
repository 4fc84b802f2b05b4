"""``topk``: the ``k`` largest-magnitude coordinates, biased and deterministic (pure numpy).

``k = min(d, max(1, ceil(fraction * d)))`` for ``d > 0`` and ``k = 0`` for
``d = 0`` (:func:`topk_count`; ``fraction * d`` is taken exactly with
``fraction`` as the decimal it is written as, so 0.07 of 100 is 7, not the 8 a
binary ``0.07 * 100 = 7.000000000000001`` would give).  The message keeps
exactly the ``k`` coordinates of ``x = child - parent`` (float32) of largest
``|x_i|``: NaN counts as larger than any number (a NaN is always kept, whatever
its sign bit), ``+-inf`` as larger than any finite value, and ties are broken
by the lower index.  Selection is one ``np.partition`` (introselect, as
``np.argpartition``) on integer magnitude keys to find the ``k``-th largest
key, O(d) on average, then everything strictly above it plus the lowest-index
coordinates equal to it: deterministic, independent of the partition's order
of ties.

Wire format (``b = max(1, ceil(log2 d))`` bits per index)::

    [ k little-endian float32 values, in ascending index order ]
    [ ceil(k * b / 8) bytes: the k indices, ascending, b bits each, least-significant bit first ]

so ``nbytes = 4 k + ceil(k b / 8)``; decoding gives zeros except the kept values.

Error: ``||Q(x) - x||^2 <= (1 - k/d) ||x||^2`` deterministically (the dropped
``d - k`` coordinates are the smallest), so :meth:`TopKCodec.variance`
returns the contraction factor ``1 - k/d``.  The codec is biased: the
convergence bound's theory does not apply to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .base import Codec, StreamKey
from .bitpack import pack, unpack

__all__ = ["TopKCodec", "index_bits", "pack_indices", "topk", "topk_count", "topk_indices", "unpack_indices"]

_ABS = np.uint32(0x7FFFFFFF)  # the float32 magnitude bits
_NAN_KEY = np.uint32(0x7F800001)  # every NaN's key: above +inf (0x7F800000), all NaNs equal


def check_fraction(fraction: object) -> float:
    """``fraction`` as a float, validated: a real number with ``0 < fraction <= 1``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"topk fraction={fraction!r} must be a number with 0 < fraction <= 1")
    f = float(fraction)
    if not (math.isfinite(f) and 0.0 < f <= 1.0):
        raise ValueError(f"topk fraction={fraction!r} out of range: expected 0 < fraction <= 1")
    return f


def topk_count(d: int, fraction: float) -> int:
    """``k = min(d, max(1, ceil(fraction * d)))`` for ``d > 0`` (``fraction`` as its decimal), 0 for ``d = 0``."""
    if d < 0:
        raise ValueError(f"vector length d={d!r} must be >= 0")
    if d == 0:
        return 0
    return min(d, max(1, math.ceil(Fraction(repr(check_fraction(fraction))) * d)))


def index_bits(d: int) -> int:
    """Bits of one index into ``d`` values: ``max(1, ceil(log2 d))``."""
    return max(1, (d - 1).bit_length())


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """The ascending indices of the ``k`` largest ``|x_i|`` of the float32 vector ``x``
    (NaN largest, then ``inf``; ties to the lower index)."""
    d = x.size
    if k >= d:
        return np.arange(d, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    key = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32) & _ABS
    np.minimum(key, _NAN_KEY, out=key)  # non-negative floats order as their bit patterns
    kth = np.partition(key, d - k)[d - k]  # the k-th largest key
    keep = key > kth
    ties = np.flatnonzero(key == kth)[: k - int(np.count_nonzero(keep))]
    keep[ties] = True
    return np.flatnonzero(keep)


def pack_indices(idx: np.ndarray, b: int) -> np.ndarray:
    """``b``-bit indices (``1 <= b <= 64``) concatenated least-significant bit first:
    ``ceil(k b / 8)`` bytes (:func:`.bitpack.pack` for ``b <= 16``)."""
    if b <= 16:
        return pack(idx.astype(np.uint8 if b <= 8 else np.uint16), b)
    wide = np.dtype("<u4" if b <= 32 else "<u8")
    k = idx.size
    bits = np.unpackbits(idx.astype(wide).view(np.uint8).reshape(k, wide.itemsize), axis=1, bitorder="little")
    return np.packbits(bits[:, :b].reshape(-1), bitorder="little")


def unpack_indices(data: np.ndarray, b: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``k`` indices of ``b`` bits, as int64."""
    if b <= 16:
        return unpack(data, b, k).astype(np.int64)
    wide = 32 if b <= 32 else 64
    bits = np.zeros((k, wide), dtype=np.uint8)
    bits[:, :b] = np.unpackbits(data, count=k * b, bitorder="little").reshape(k, b)
    words = np.packbits(bits, axis=1, bitorder="little").view("<u4" if wide == 32 else "<u8").reshape(k)
    return words.astype(np.int64)


@dataclass(frozen=True)
class TopKCodec(Codec):
    """The ``k = ceil(fraction * d)`` largest-magnitude coordinates, values float32."""

    fraction: float = 0.01
    biased = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", check_fraction(self.fraction))

    @property
    def name(self) -> str:
        return f"topk(fraction={self.fraction!r})"

    def k(self, d: int) -> int:
        """Coordinates kept of ``d`` (:func:`topk_count`)."""
        return topk_count(d, self.fraction)

    def nbytes(self, d: int) -> int:
        """``4 k + ceil(k b / 8)``."""
        k = self.k(d)
        return 4 * k + (k * index_bits(d) + 7) // 8

    def norm_factor(self, d: int) -> float:
        """1: it keeps a subset of the coordinates."""
        return 1.0

    def variance(self, d: int) -> float:
        """The deterministic contraction factor ``1 - k/d`` (0 for ``d = 0``)."""
        return 0.0 if d == 0 else 1.0 - self.k(d) / d

    def encode_vector(self, x: np.ndarray, gen: np.random.Generator | None = None) -> np.ndarray:
        """The message for the float32 vector ``x`` (``gen`` unused: deterministic)."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        d = x.size
        k = self.k(d)
        out = np.empty(self.nbytes(d), dtype=np.uint8)
        idx = topk_indices(x, k)
        out[: 4 * k] = x[idx].astype("<f4").view(np.uint8)
        out[4 * k :] = pack_indices(idx, index_bits(d))
        return out

    def encode(self, child: np.ndarray, parent: np.ndarray, key: StreamKey) -> np.ndarray:
        """The message for ``child - parent`` (float32); deterministic, ``key`` is unused."""
        child = np.ascontiguousarray(child, dtype=np.float32).reshape(-1)
        parent = np.ascontiguousarray(parent, dtype=np.float32).reshape(-1)
        if child.shape != parent.shape:
            raise ValueError(f"child {child.shape} and parent {parent.shape} differ in shape")
        return self.encode_vector(child - parent)

    def decode(self, buf: np.ndarray, d: int) -> np.ndarray:
        """Zeros except the kept values of a message of :meth:`nbytes` ``(d)`` bytes."""
        buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
        if buf.size != self.nbytes(d):
            raise ValueError(f"{self.name} message of {buf.size} bytes, expected {self.nbytes(d)} for d={d}")
        k = self.k(d)
        out = np.zeros(d, dtype=np.float32)
        if k == 0:
            return out
        vals = np.frombuffer(buf[: 4 * k].tobytes(), dtype="<f4")
        idx = unpack_indices(buf[4 * k :], index_bits(d), k)
        if idx[-1] >= d or (k > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
            raise ValueError(f"{self.name} message for d={d}: its indices are not ascending in 0 .. {d - 1}")
        out[idx] = vals
        return out


def topk(levels: int, bucket: int | str, fraction: float = 0.01) -> Codec:
    """Factory of the ``topk`` codec (biased): ``fraction`` is ``quantizer.topk_fraction``
    (``0 < fraction <= 1``); ``levels`` and ``bucket`` are ignored."""
    return TopKCodec(fraction=check_fraction(fraction))
