"""``intsum``: integer codes a parent can add up, for secure aggregation (docs/privacy.md).

A child's clipped update ``u`` (``||u|| <= C``) becomes ``b``-bit integers mod ``2^b``:

1. optionally rotated, ``y = H D pad(u)`` (``D`` random signs shared by the group, ``H`` the orthonormal
   Walsh-Hadamard transform on the next power of two; ``quantizer.rotate``), which spreads a few large
   coordinates over all of them;
2. scaled by ``gamma`` (shared by the group) and by the child's aggregation weight ``a``;
3. rounded stochastically to integers (unbiased: ``floor(z) + [u < z - floor(z)]``, ``u`` from the message's
   key);
4. wrapped mod ``2^b``.

The parent adds the children's codes mod ``2^b`` (with or without masks: they cancel in the sum), reads the sum
as signed, divides by ``gamma`` and rotates back: the weighted sum of the updates, up to the rounding.  The sum is
exact integer arithmetic, so it is the same in any order, on any number of ranks.  No wrap-around happens when
``gamma C A + m < 2^(b-1)`` (``A`` the most a group's weights add up to, ``m`` its children), which the config
checks.

Wire format: ``d'`` codes of ``b`` bits packed least-significant bit first (``b <= 16``), or one little-endian
32-bit word per code (``17 <= b <= 32``); ``d'`` is ``d`` or, rotated, the next power of two.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Codec, StreamKey
from .bitpack import pack, unpack
from .stream import key_words, uniforms

__all__ = ["IntSumCodec", "code_length", "fwht", "intsum"]


def fwht(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of ``x`` (length a power of two; float64); its own inverse."""
    n = x.size
    out = np.asarray(x, dtype=np.float64).copy()
    h = 1
    while h < n:
        blocks = out.reshape(-1, 2, h)
        out = np.stack([blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]], axis=1).reshape(-1)
        h *= 2
    return out / math.sqrt(n)


def code_length(d: int, rotate: bool) -> int:
    """The codes of a ``d``-value message: ``d``, or rotated the next power of two."""
    return 1 << max(0, (d - 1).bit_length()) if rotate and d else d


@dataclass(frozen=True)
class IntSumCodec(Codec):
    """``b``-bit integer codes mod ``2^b`` with scale ``scale`` (``gamma``), optionally rotated."""

    bits: int
    scale: float
    rotate: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise ValueError(f"intsum: {self.bits} bits (quantizer.levels): expected 2 .. 32")
        if not self.scale > 0 or not math.isfinite(self.scale):
            raise ValueError(f"intsum: scale {self.scale!r}: expected a finite number > 0")

    @property
    def name(self) -> str:
        return f"intsum(b={self.bits}, scale={self.scale:.6g}{', rotated' if self.rotate else ''})"

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    def length(self, d: int) -> int:
        """The codes per message: ``d``, or rotated the next power of two."""
        return code_length(d, self.rotate)

    def nbytes(self, d: int) -> int:
        n = self.length(d)
        return (n * self.bits + 7) // 8 if self.bits <= 16 else 4 * n

    def variance(self, d: int) -> float:
        """0: the rounding error is additive (at most ``sqrt(d') / gamma`` in norm), not relative."""
        return 0.0

    # ---- a child's codes and the group's sum ------------------------------------
    def signs(self, key: StreamKey, d: int) -> np.ndarray:
        """The rotation's random signs ``D`` (float64 +-1) from the group's key."""
        k0, k1 = key_words(key)
        return np.where(uniforms(k0, k1, 0, self.length(d)) < np.float32(0.5), -1.0, 1.0)

    def codes(self, u: np.ndarray, weight: float, key: StreamKey, rotation: StreamKey) -> np.ndarray:
        """Child's codes (uint64 in ``[0, 2^b)``) of its update ``u`` with weight ``weight``; ``key`` draws the
        rounding, ``rotation`` the group's signs."""
        d = u.size
        y = np.zeros(self.length(d), dtype=np.float64)
        y[:d] = np.asarray(u, dtype=np.float32)
        if self.rotate:
            y = fwht(self.signs(rotation, d) * y)
        z = y * (float(self.scale) * float(weight))
        lo = np.floor(z)
        k0, k1 = key_words(key)
        q = lo + (uniforms(k0, k1, 0, z.size).astype(np.float64) < z - lo)
        return np.mod(q.astype(np.int64), self.modulus).astype(np.uint64)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        if self.bits <= 16:
            return pack(codes.astype(np.uint16 if self.bits > 8 else np.uint8), self.bits)
        return codes.astype("<u4").view(np.uint8).copy()

    def unpack(self, buf: np.ndarray, d: int) -> np.ndarray:
        n = self.length(d)
        if self.bits <= 16:
            return unpack(np.asarray(buf, dtype=np.uint8), self.bits, n).astype(np.uint64)
        return np.asarray(buf, dtype=np.uint8)[: 4 * n].view("<u4").astype(np.uint64)

    def decode_sum(self, total: np.ndarray, d: int, rotation: StreamKey) -> np.ndarray:
        """The float32 weighted sum of the updates from the group's codes added mod ``2^b``."""
        t = np.mod(np.asarray(total, dtype=np.uint64), np.uint64(self.modulus)).astype(np.int64)
        signed = np.where(t >= self.modulus // 2, t - self.modulus, t).astype(np.float64) / float(self.scale)
        if self.rotate:
            signed = self.signs(rotation, d) * fwht(signed)
        return signed[:d].astype(np.float32)

    # ---- the Codec interface (one child alone: its own sum) ------------------------
    def encode_vector(self, x: np.ndarray, gen: np.random.Generator | None = None) -> np.ndarray:
        raise TypeError("intsum codes are made per group (codes(); the executor's summing path), not one by one")

    def encode(self, child: np.ndarray, parent: np.ndarray, key: StreamKey) -> np.ndarray:
        """A child's message alone, weight 1, unrotated signs from ``key`` (tests and tools)."""
        u = np.asarray(child, dtype=np.float32) - np.asarray(parent, dtype=np.float32)
        return self.pack(self.codes(u, 1.0, key, key))

    def decode(self, buf: np.ndarray, d: int) -> np.ndarray:
        raise TypeError("intsum messages are read as a group's sum (decode_sum), with the group's rotation key")


def intsum(levels: int, bucket: int | str = 0, scale: float = 1.0, rotate: bool = False,
           **_: Sequence[int]) -> IntSumCodec:
    """The ``intsum`` codec of ``quantizer.levels`` bits (the bucket is unused: one scale for the group)."""
    return IntSumCodec(int(levels), float(scale), bool(rotate))
