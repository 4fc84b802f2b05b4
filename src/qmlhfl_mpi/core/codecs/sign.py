"""``sign``: scaled sign per bucket, biased and deterministic (pure numpy).

The scaled sign of EF-signSGD (Karimireddy et al. 2019): every coordinate of a
bucket travels as one bit and decodes to ``+-scale``, ``scale`` the bucket's
mean magnitude ``||x_b||_1 / n_b``.  Buckets are those of ``qsgd``: ``bucket``
values per scale (the last bucket ragged), 0 for one global scale, or
``'tensor'`` for one scale per parameter tensor (:mod:`.tensor`).

Wire format (``d`` values, ``nb`` buckets)::

    [ nb little-endian float32 scales ]
    [ ceil(d / 8) bytes: one bit per coordinate, 1 = negative (x_i < 0), least-significant bit first ]

so ``nbytes = 4 * nb + ceil(d / 8)``.  Coordinate ``i`` of bucket ``k`` decodes
to ``scale_k`` if its bit is 0 and ``-scale_k`` if it is 1 (zeros and NaNs have
bit 0).  The scale is the float64 sum of ``|x_j|`` over the bucket (numpy's
summation order), divided by ``n_b`` in float64, then rounded once to float32.
A bucket holding an infinity or a NaN gets the scale ``inf`` or ``nan`` and
decodes to it (never an error).

Error: with ``m = ||x||_1 / n`` and all signs ``+-1``,
``||x - m sign(x)||^2 = ||x||^2 - ||x||_1^2 / n <= (1 - 1/n) ||x||^2`` (as
``||x||_1 >= ||x||_2``), equality for a bucket with one non-zero value; so
:meth:`SignCodec.variance` is ``1 - 1/B``, ``B`` the (largest) bucket length.
It is a deterministic contraction factor, not a variance: the codec is biased
and outside the convergence bound.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Codec, StreamKey
from .qsgd import num_buckets
from .tensor import TENSOR, TensorBucketCodec, parse_bucket

__all__ = ["SignCodec", "sign"]


def _diff(child: np.ndarray, parent: np.ndarray) -> np.ndarray:
    child = np.ascontiguousarray(child, dtype=np.float32).reshape(-1)
    parent = np.ascontiguousarray(parent, dtype=np.float32).reshape(-1)
    if child.shape != parent.shape:
        raise ValueError(f"child {child.shape} and parent {parent.shape} differ in shape")
    return child - parent


@dataclass(frozen=True)
class SignCodec(Codec):
    """Scaled sign with one float32 scale (mean magnitude) per bucket of ``bucket`` values."""

    bucket: int = 0
    biased = True

    def __post_init__(self) -> None:
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, (int, np.integer)) or self.bucket < 0:
            raise ValueError(f"bucket={self.bucket!r} must be an integer >= 0 (0 means one global scale)")

    @property
    def name(self) -> str:
        return f"sign(bucket={self.bucket})"

    def _blocks(self, d: int) -> tuple[int, int]:
        nb = num_buckets(d, self.bucket)
        return nb, (d if nb <= 1 else self.bucket)

    def nbytes(self, d: int) -> int:
        """``4 * nb + ceil(d / 8)``."""
        return 4 * num_buckets(d, self.bucket) + (d + 7) // 8

    def norm_factor(self, d: int) -> float:
        """1: a bucket's ``sqrt(B) mean|x|`` is at most its norm."""
        return 1.0

    def variance(self, d: int) -> float:
        """The worst-case factor ``1 - 1/B`` of ``||Q(x) - x||^2 <= q ||x||^2`` (deterministic;
        ``B`` the bucket length, ``d`` for one global scale; 0 for ``d = 0``)."""
        if d == 0:
            return 0.0
        _, blen = self._blocks(d)
        return 1.0 - 1.0 / blen

    def scales(self, x: np.ndarray) -> np.ndarray:
        """The float32 scale of every bucket of ``x``: ``float32(sum_b |x_j| / n_b)`` in float64."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        d = x.size
        nb, blen = self._blocks(d)
        if d == 0:
            return np.zeros(0, dtype=np.float32)
        mag = np.abs(x).astype(np.float64)
        full = d // blen
        sums = np.empty(nb, dtype=np.float64)
        counts = np.full(nb, float(blen))
        sums[:full] = mag[: full * blen].reshape(full, blen).sum(axis=1)
        if full < nb:
            sums[full] = mag[full * blen :].sum()
            counts[full] = d - full * blen
        with np.errstate(invalid="ignore", over="ignore"):
            return (sums / counts).astype(np.float32)

    def encode(self, child: np.ndarray, parent: np.ndarray, key: StreamKey) -> np.ndarray:
        """The message for ``child - parent`` (float32); deterministic, ``key`` is unused."""
        x = _diff(child, parent)
        d = x.size
        out = np.empty(self.nbytes(d), dtype=np.uint8)
        if d == 0:
            return out
        nb = self._blocks(d)[0]
        out[: 4 * nb] = self.scales(x).astype("<f4").view(np.uint8)
        out[4 * nb :] = np.packbits(x < 0, bitorder="little")
        return out

    def encode_vector(self, x: np.ndarray, gen: np.random.Generator | None = None) -> np.ndarray:
        """The message for ``x`` (``gen`` unused: deterministic)."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        return self.encode(x, np.zeros_like(x), ())

    def encode_words(self, child: np.ndarray, parent: np.ndarray, k0: int, k1: int) -> np.ndarray:
        """:meth:`encode` (the stream words are unused)."""
        return self.encode(child, parent, ())

    def encode_add_words(self, child: np.ndarray, parent: np.ndarray, k0: int, k1: int, a: np.float32,
                         acc: np.ndarray) -> None:
        """:meth:`encode_add` (the stream words are unused)."""
        self.encode_add(child, parent, (), a, acc)

    def decode(self, buf: np.ndarray, d: int) -> np.ndarray:
        """``+-scale_k`` per coordinate of a message of :meth:`nbytes` ``(d)`` bytes."""
        buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
        if buf.size != self.nbytes(d):
            raise ValueError(f"{self.name} message of {buf.size} bytes, expected {self.nbytes(d)} for d={d}")
        if d == 0:
            return np.zeros(0, dtype=np.float32)
        nb, blen = self._blocks(d)
        scales = np.frombuffer(buf[: 4 * nb].tobytes(), dtype="<f4").astype(np.float32)
        negative = np.unpackbits(buf[4 * nb :], count=d, bitorder="little").astype(np.uint32)
        full = np.empty(nb * blen, dtype=np.float32)
        full.reshape(nb, blen)[...] = scales[:, None]
        out = full[:d]
        out.view(np.uint32)[...] ^= negative << np.uint32(31)  # -scale: the sign bit flipped (exact)
        return out


def sign(levels: int, bucket: int | str, tensor_sizes: Sequence[int] | None = None) -> Codec:
    """Factory of the ``sign`` codec (biased); ``levels`` is ignored.

    ``bucket``: values per scale (0: one global scale) or ``'tensor'`` with the model's
    ``tensor_sizes`` (one scale per parameter tensor; ``tensor_sizes`` is ignored otherwise).
    """
    blen, sizes = parse_bucket(bucket, tensor_sizes, "sign")
    if sizes is None:
        return SignCodec(bucket=blen)
    return TensorBucketCodec(SignCodec(bucket=0), sizes, f"sign(bucket={TENSOR})")
