"""``none``: the difference travels as little-endian float32 (no quantization)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Codec


class IdentityCodec(Codec):
    """Lossless float32 messages of ``4 d`` bytes."""

    levels = 0

    @property
    def name(self) -> str:
        return "none"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdentityCodec)

    def __hash__(self) -> int:
        return hash("none")

    def __repr__(self) -> str:
        return "IdentityCodec()"

    def nbytes(self, d: int) -> int:
        return 4 * d

    def variance(self, d: int) -> float:
        return 0.0

    def norm_factor(self, d: int) -> float:
        return 1.0

    def encode_vector(self, x: np.ndarray, gen: np.random.Generator | None = None) -> np.ndarray:
        return np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(-1).copy()

    def encode(self, child: np.ndarray, parent: np.ndarray, key: Sequence[int]) -> np.ndarray:
        """``child - parent`` as float32 bytes (no randomness: ``key`` is unused)."""
        return self.encode_vector(np.asarray(child, dtype=np.float32) - np.asarray(parent, dtype=np.float32))

    def encode_add(self, child: np.ndarray, parent: np.ndarray, key: Sequence[int], a: np.float32,
                   acc: np.ndarray) -> None:
        """``acc += a * (child - parent)`` in float32, as decode_add(encode(...)) computes it."""
        dec = np.asarray(child, dtype=np.float32) - np.asarray(parent, dtype=np.float32)
        dec *= np.float32(a)
        acc += dec

    def decode(self, buf: np.ndarray, d: int) -> np.ndarray:
        if buf.size != 4 * d:
            raise ValueError(f"float32 message of {buf.size} bytes, expected {4 * d} for d={d}")
        return np.frombuffer(buf.tobytes(), dtype="<f4").astype(np.float32)


def identity(levels: int = 0, bucket: int | str = 0) -> IdentityCodec:
    """Factory of the ``none`` codec; ``levels`` and ``bucket`` are ignored."""
    return IdentityCodec()
