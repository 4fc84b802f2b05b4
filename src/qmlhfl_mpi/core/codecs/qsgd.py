"""``qsgd``: the QSGD-family stochastic, unbiased quantizer with buckets (pure numpy).

A message's length is a pure function of ``(d, s, bucket)``.

Wire format of :class:`QSGDCodec` (``s`` levels, bucket length ``B``)::

    nb  = ceil(d / B)            (B = d when bucket == 0: one global norm)
    b   = ceil(log2(s + 1))      bits of a level index
    w   = 1 + b                  bits per coordinate
    [ nb little-endian float32 bucket norms ]
    [ ceil(d * w / 8) bytes: d codes of w bits, code_i = sign_i | level_i << 1,
      concatenated least-significant bit first ]

so ``nbytes = 4 * nb + ceil(d * w / 8)``.  Coordinate ``i`` of bucket ``k``
decodes to ``norm_k * (-1)**sign_i * level_i / s``.  The level is
``floor(s |x_i| / norm_k + u_i)`` with ``u_i ~ U[0, 1)``, which is
``floor(s |x_i| / norm_k)`` or that plus one with the probabilities that make
the result unbiased.

With ``bucket: tensor`` (one norm per parameter tensor) the message is the
concatenation of the ``bucket = 0`` messages of the tensors' slices, the
whole vector's random stream kept: see :mod:`.tensor`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Codec, StreamKey
from .bitpack import pack, unpack
from .identity import IdentityCodec
from .kernels import HAVE_NUMBA, qsgd_decode_add, qsgd_encode, qsgd_quantize_add
from .stream import key_words, uniforms
from .tensor import TENSOR, TensorBucketCodec, parse_bucket

MAX_LEVELS = 32767  # 15 level bits + 1 sign bit = 16-bit codes at most


def level_bits(s: int) -> int:
    """Bits of one level index for ``s`` levels: ``ceil(log2(s + 1))``."""
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= MAX_LEVELS:
        raise ValueError(f"levels s={s!r} out of range: expected an integer 1 <= s <= {MAX_LEVELS}")
    return max(1, math.ceil(math.log2(s + 1)))


def num_buckets(d: int, bucket: int) -> int:
    """Number of buckets (and float32 norms) for a vector of length ``d``."""
    if d < 0:
        raise ValueError(f"vector length d={d!r} must be >= 0")
    if bucket < 0:
        raise ValueError(f"bucket={bucket!r} must be >= 0 (0 means one global norm)")
    if d == 0:
        return 0
    if bucket == 0 or bucket >= d:
        return 1
    return -(-d // bucket)


def qsgd_nbytes(d: int, s: int, bucket: int) -> int:
    """Exact byte length of a QSGD message: ``4*nb + ceil(d*(1+b)/8)``."""
    w = 1 + level_bits(s)
    return 4 * num_buckets(d, bucket) + (d * w + 7) // 8


def variance_factor(d: int, s: int, bucket: int) -> float:
    """QSGD variance bound ``q = min(B/s^2, sqrt(B)/s)``, ``B`` the bucket length.

    ``E||Q(x) - x||^2 <= q ||x||^2`` holds bucket by bucket, hence for the whole
    vector.  ``s == 0`` (no quantization) gives ``q = 0``.
    """
    if s == 0 or d == 0:
        return 0.0
    blen = d if bucket == 0 else min(bucket, d)
    return min(blen / s**2, math.sqrt(blen) / s)


@functools.cache
def _signed_levels(w: int) -> np.ndarray:
    """Signed level of every ``w``-bit code: ``table[level << 1 | sign]``."""
    codes = np.arange(1 << w, dtype=np.int64)
    table = (codes >> 1).astype(np.float32)
    table[codes & 1 == 1] *= -1
    table.setflags(write=False)
    return table


@dataclass(frozen=True)
class QSGDCodec(Codec):
    """Stochastic unbiased quantizer with ``levels`` levels per bucket norm."""

    levels: int
    bucket: int = 512

    def __post_init__(self) -> None:
        level_bits(self.levels)  # validates the range
        if self.bucket < 0:
            raise ValueError(f"bucket={self.bucket!r} must be >= 0 (0 means one global norm)")

    @property
    def name(self) -> str:
        return f"qsgd(s={self.levels}, bucket={self.bucket})"

    @property
    def width(self) -> int:
        return 1 + level_bits(self.levels)

    def nbytes(self, d: int) -> int:
        return qsgd_nbytes(d, self.levels, self.bucket)

    def variance(self, d: int) -> float:
        return variance_factor(d, self.levels, self.bucket)

    def _blocks(self, d: int) -> tuple[int, int]:
        nb = num_buckets(d, self.bucket)
        blen = d if nb <= 1 else self.bucket
        return nb, blen

    def norm_factor(self, d: int) -> float:
        """``1 + sqrt(B) / s`` (``B`` the bucket length): each coordinate moves by at most one level,
        ``|Q(x)_i| <= |x_i| + ||x_bucket|| / s``."""
        return 1.0 + math.sqrt(self._blocks(d)[1]) / self.levels

    def encode(self, child: np.ndarray, parent: np.ndarray, key: StreamKey) -> np.ndarray:
        """The message for ``child - parent`` in one fused pass (compiled kernel; the numpy
        reference :func:`encode_reference` where numba is missing).  Randomness from ``key``."""
        k0, k1 = key_words(key)
        return self.encode_words(child, parent, k0, k1)

    def encode_words(self, child: np.ndarray, parent: np.ndarray, k0: int, k1: int) -> np.ndarray:
        """:meth:`encode` under the stream words ``(k0, k1)`` of a key (see :mod:`.stream`);
        ``bucket: tensor`` encodes each tensor's slice under shifted words (:mod:`.tensor`)."""
        if not HAVE_NUMBA:  # pragma: no cover
            return _encode_reference_words(self, child, parent, k0, k1)
        child, parent = _as_f32(child), _as_f32(parent)
        if child.shape != parent.shape:
            raise ValueError(f"child {child.shape} and parent {parent.shape} differ in shape")
        d = child.size
        out = np.empty(self.nbytes(d), dtype=np.uint8)
        if d:
            nb, blen = self._blocks(d)
            qsgd_encode(child, parent, self.levels, blen, nb, self.width, k0, k1, out)
        return out

    def decode_add(self, buf: np.ndarray, a: np.float32, acc: np.ndarray) -> None:
        """``acc += a * decode(buf)`` in one pass over the message (compiled kernel)."""
        if not HAVE_NUMBA:  # pragma: no cover
            decode_add_reference(self, buf, a, acc)
            return
        d = acc.size
        buf = self._checked(buf, d)
        if d:
            nb, blen = self._blocks(d)
            qsgd_decode_add(buf, self.levels, blen, nb, self.width, np.float32(a), acc)

    def encode_add(self, child: np.ndarray, parent: np.ndarray, key: StreamKey, a: np.float32,
                   acc: np.ndarray) -> None:
        """``decode_add(encode(child, parent, key), a, acc)`` in one pass, without packing the bits
        (the same floats in the same order: bit-identical, tested)."""
        k0, k1 = key_words(key)
        self.encode_add_words(child, parent, k0, k1, a, acc)

    def encode_add_words(self, child: np.ndarray, parent: np.ndarray, k0: int, k1: int, a: np.float32,
                         acc: np.ndarray) -> None:
        """:meth:`encode_add` under the stream words ``(k0, k1)`` (see :meth:`encode_words`)."""
        if not HAVE_NUMBA:  # pragma: no cover
            decode_add_reference(self, _encode_reference_words(self, child, parent, k0, k1), a, acc)
            return
        child, parent = _as_f32(child), _as_f32(parent)
        if child.size != acc.size or parent.size != acc.size:
            raise ValueError(f"child {child.size}, parent {parent.size} and accumulator {acc.size} differ in length")
        if acc.size:
            nb, blen = self._blocks(acc.size)
            qsgd_quantize_add(child, parent, self.levels, blen, nb, k0, k1, np.float32(a), acc)

    def encode_vector(self, x: np.ndarray, gen: np.random.Generator | None) -> np.ndarray:
        """The message for ``x`` itself (parent zero), keyed by a number drawn from ``gen``."""
        assert gen is not None, "qsgd draws random numbers: pass a generator"
        x = _as_f32(x)
        return self.encode(x, np.zeros_like(x), (int(gen.integers(2**63)),))

    def _checked(self, buf: np.ndarray, d: int) -> np.ndarray:
        buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
        if buf.size != self.nbytes(d):
            raise ValueError(f"{self.name} message of {buf.size} bytes, expected {self.nbytes(d)} for d={d}")
        return buf

    def decode(self, buf: np.ndarray, d: int) -> np.ndarray:
        """Unpack a message of :meth:`nbytes` ``(d)`` bytes into a float32 vector."""
        buf = self._checked(buf, d)
        nb, blen = self._blocks(d)
        if d == 0:
            return np.zeros(0, dtype=np.float32)
        norms = np.frombuffer(buf[: 4 * nb].tobytes(), dtype="<f4")
        codes = unpack(buf[4 * nb :], self.width, d)
        vals = np.take(_signed_levels(self.width), codes)
        if nb * blen != d:
            full = np.zeros(nb * blen, dtype=np.float32)
            full[:d] = vals
        else:
            full = vals
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite norms propagate as NaN
            full.reshape(nb, blen)[...] *= (norms / np.float32(self.levels)).astype(np.float32)[:, None]
        return full[:d]


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


def _sumsq8_reference(xb: np.ndarray) -> np.ndarray:
    """Per row of ``xb``, the sum of squares in eight lanes (element ``j`` into lane ``j % 8``,
    each lane summed in order), the lanes then added in order: the kernels' order."""
    nb, blen = xb.shape
    padded = np.zeros((nb, -(-blen // 8) * 8), dtype=np.float32)
    padded[:, :blen] = xb
    sq = padded.reshape(nb, -1, 8)
    lanes = np.cumsum(sq * sq, axis=1, dtype=np.float32)[:, -1, :]
    return np.cumsum(lanes, axis=1, dtype=np.float32)[:, -1]


def encode_reference(codec: QSGDCodec, child: np.ndarray, parent: np.ndarray, key: StreamKey) -> np.ndarray:
    """The numpy reference of :meth:`QSGDCodec.encode`: the same float32 operations in the
    same order (the norm in eight lanes, see :func:`_sumsq8_reference`), vectorised over buckets."""
    k0, k1 = key_words(key)
    return _encode_reference_words(codec, child, parent, k0, k1)


def _encode_reference_words(codec: QSGDCodec, child: np.ndarray, parent: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """:func:`encode_reference` under the stream words ``(k0, k1)``."""
    x = _as_f32(child) - _as_f32(parent)
    d, s = x.size, codec.levels
    out = np.empty(codec.nbytes(d), dtype=np.uint8)
    if d == 0:
        return out
    nb, blen = codec._blocks(d)
    flat = np.zeros(nb * blen, dtype=np.float32)
    flat[:d] = x
    xb = flat.reshape(nb, blen)
    u = uniforms(k0, k1, 0, nb * blen).reshape(nb, blen)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        norms = np.sqrt(_sumsq8_reference(xb))
        scale = np.where(norms > 0, np.float32(s) / norms, np.float32(0)).astype(np.float32)
        y = np.abs(xb) * scale[:, None] + u
        bad = ~np.isfinite(norms)
        if bad.any():  # inf/nan inputs: keep codes in range, decode yields nan
            yb = y[bad]
            yb[np.isnan(yb)] = 0
            np.minimum(yb, np.float32(s), out=yb)
            y[bad] = yb
    codes = np.minimum(y.reshape(-1)[:d].astype(np.uint32), np.uint32(s))
    codes = (codes << np.uint32(1)) | (x < 0).astype(np.uint32)  # the sign bit: x < 0 (zeros and nan: 0)
    out[: 4 * nb] = norms.astype("<f4").view(np.uint8)
    out[4 * nb :] = pack(codes.astype(np.uint16 if codec.width > 8 else np.uint8), codec.width)
    return out


def decode_add_reference(codec: QSGDCodec, buf: np.ndarray, a: np.float32, acc: np.ndarray) -> None:
    """The numpy reference of :meth:`QSGDCodec.decode_add`."""
    dec = codec.decode(buf, acc.size)
    dec *= np.float32(a)
    acc += dec


def qsgd(levels: int, bucket: int | str = 512, tensor_sizes: Sequence[int] | None = None) -> Codec:
    """Factory of the ``qsgd`` codec; ``levels == 0`` means no quantization (float32).

    ``bucket`` is an integer >= 0 (values per norm; 0: one global norm), or ``'tensor'``: one
    norm per parameter tensor, ``tensor_sizes`` the model's tensor sizes in order (ignored for
    an integer bucket); see :class:`~.tensor.TensorBucketCodec`.  Any other argument is a
    ``TypeError`` (no ``**kwargs``: the engine offers a factory only the arguments it names).
    """
    blen, sizes = parse_bucket(bucket, tensor_sizes, "qsgd")
    if levels == 0 and not isinstance(levels, bool):
        return IdentityCodec()
    if sizes is None:
        return QSGDCodec(levels=levels, bucket=blen)
    return TensorBucketCodec(QSGDCodec(levels=levels, bucket=0), sizes, f"qsgd(s={levels}, bucket={TENSOR})")
