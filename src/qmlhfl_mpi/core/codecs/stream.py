"""The quantizer's counter-based random stream (pure numpy reference).

A message's randomness is a function of its key ``(seed, QUANT, layer, child,
round, call)`` and of the coordinate index alone, so any rank, any thread
count and any implementation (this numpy reference, the compiled kernels of
:mod:`.kernels`) draws the same numbers:

* the key is folded into two 32-bit words ``(k0, k1)`` by :func:`key_words`
  (splitmix64 steps over the key's integers, once per message);
* coordinate ``i`` gets ``h = mix32((i * 0x9E3779B1 + k0) mod 2^32 XOR k1)``,
  with ``mix32`` the "lowbias32" integer finaliser (two multiplies, three
  xor-shifts; a bijection of 32-bit words);
* ``u_i = (h >> 8) * 2^-24``: 24 random bits as an exact float32 in ``[0, 1)``.

For a fixed key, ``i -> h`` is a bijection on ``0 .. 2^32 - 1``, so the draws
of one message never repeat within a vector of up to 2^32 coordinates.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN32 = 0x9E3779B1
MIX1, MIX2 = 0x7FEB352D, 0x846CA68B
INV_2_24 = np.float32(1.0 / (1 << 24))


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def key_words(key: Sequence[int]) -> tuple[int, int]:
    """The two 32-bit stream words of a key of non-negative integers (each < 2^64)."""
    h = 0x243F6A8885A308D3  # pi's fraction: the fold starts away from zero
    for part in key:
        p = int(part)
        if not 0 <= p <= MASK64:
            raise ValueError(f"stream key {tuple(key)!r}: every part must be an integer in 0 .. 2^64-1")
        h = _splitmix64(h ^ p)
    return h & 0xFFFFFFFF, h >> 32


def uniforms(k0: int, k1: int, start: int, stop: int) -> np.ndarray:
    """``u_i`` for ``i = start .. stop-1`` as float32 (the reference of the kernels' draw)."""
    return uniforms_at(k0, k1, np.arange(start, stop, dtype=np.uint64))


def uniforms_at(k0: int, k1: int, index: np.ndarray) -> np.ndarray:
    """``u_i`` for the counters ``index`` (any order, any subset) as float32."""
    i = np.asarray(index, dtype=np.uint64).astype(np.uint32)
    with np.errstate(over="ignore"):
        h = i * np.uint32(GOLDEN32) + np.uint32(k0)
        h ^= np.uint32(k1)
        h ^= h >> np.uint32(16)
        h *= np.uint32(MIX1)
        h ^= h >> np.uint32(15)
        h *= np.uint32(MIX2)
        h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * INV_2_24
