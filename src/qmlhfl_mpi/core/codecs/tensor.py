"""``bucket: tensor``: one scale per parameter tensor (pure numpy).

With ``quantizer.bucket: tensor`` a codec gets the model's parameter tensor
sizes ``n_1 .. n_T`` (in order, summing to ``d``) and quantizes each tensor's
slice of the vector as one bucket.  :class:`TensorBucketCodec` wraps the
codec's one-global-scale (``bucket = 0``) form, the *inner* codec, and its
message is the concatenation over tensors ``t`` of the inner message of
tensor ``t``'s slice::

    [ inner message of x[s_1 : s_1 + n_1] ] ... [ inner message of x[s_T : s_T + n_T] ]

so every tensor's part is byte aligned and ``nbytes(d) = sum_t inner.nbytes(n_t)``
(for ``qsgd``: ``sum_t (4 + ceil(n_t * w / 8))``).

The random stream stays the one of the whole vector: coordinate ``i`` of the
full vector draws the same ``u_i`` as in a message over the whole vector,
because the slice starting at ``s_t`` is encoded with the key words
``(k0 + s_t * GOLDEN32 mod 2^32, k1)`` (the hash input of slice coordinate
``j`` is then ``(s_t + j) * GOLDEN32 + k0 mod 2^32``; see :mod:`.stream`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .base import Codec, StreamKey
from .stream import GOLDEN32, key_words

__all__ = ["TENSOR", "SliceCodec", "TensorBucketCodec", "parse_bucket", "shifted_words"]

TENSOR = "tensor"
MASK32 = 0xFFFFFFFF


class SliceCodec(Protocol):
    """What :class:`TensorBucketCodec` needs of its inner (``bucket = 0``) codec: the
    :class:`~.base.Codec` methods plus encoding under explicit stream words."""

    biased: bool

    @property
    def name(self) -> str: ...

    def nbytes(self, d: int) -> int: ...

    def variance(self, d: int) -> float: ...

    def norm_factor(self, d: int) -> float | None: ...

    def decode(self, buf: np.ndarray, d: int) -> np.ndarray: ...

    def decode_add(self, buf: np.ndarray, a: np.float32, acc: np.ndarray) -> None: ...

    def encode_words(self, child: np.ndarray, parent: np.ndarray, k0: int, k1: int) -> np.ndarray:
        """The message for ``child - parent`` drawing from the stream words ``(k0, k1)``."""
        ...

    def encode_add_words(self, child: np.ndarray, parent: np.ndarray, k0: int, k1: int, a: np.float32,
                         acc: np.ndarray) -> None:
        """``decode_add(encode_words(child, parent, k0, k1), a, acc)``."""
        ...


def shifted_words(k0: int, k1: int, start: int) -> tuple[int, int]:
    """Stream words under which coordinate ``j`` of a slice starting at ``start`` draws the
    ``u`` of coordinate ``start + j`` of the whole vector: ``(k0 + start * GOLDEN32 mod 2^32, k1)``."""
    return (k0 + start * GOLDEN32) & MASK32, k1


def parse_bucket(bucket: object, tensor_sizes: Sequence[int] | None, kind: str) -> tuple[int, tuple[int, ...] | None]:
    """Validate a codec's ``bucket`` (an integer >= 0, or ``'tensor'`` with ``tensor_sizes``).

    Returns ``(bucket, None)`` for an integer bucket (``tensor_sizes`` is then ignored) and
    ``(0, sizes)`` for ``'tensor'``, ``sizes`` the tensor sizes as a tuple of positive ints.
    """
    if isinstance(bucket, str):
        if bucket != TENSOR:
            raise ValueError(f"codec {kind!r}: bucket={bucket!r} is not valid: expected an integer >= 0 "
                             f"(0 means one global norm) or {TENSOR!r} (one norm per parameter tensor)")
        if tensor_sizes is None:
            raise ValueError(f"codec {kind!r}: bucket={TENSOR!r} needs the model's parameter tensor sizes, "
                             "got tensor_sizes=None")
        if isinstance(tensor_sizes, (str, bytes)) or not isinstance(tensor_sizes, (Sequence, np.ndarray)):
            raise ValueError(f"codec {kind!r}: tensor_sizes={tensor_sizes!r} must be a sequence of positive integers")
        sizes = tuple(tensor_sizes)
        if not sizes:
            raise ValueError(f"codec {kind!r}: tensor_sizes=() names no tensor: expected at least one positive size")
        for i, n in enumerate(sizes):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"codec {kind!r}: tensor_sizes[{i}]={n!r} must be an integer >= 1")
        return 0, tuple(int(n) for n in sizes)
    if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 0:
        raise ValueError(f"bucket={bucket!r} must be an integer >= 0 (0 means one global norm) "
                         f"or {TENSOR!r} (one norm per parameter tensor)")
    return int(bucket), None


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)


@dataclass(frozen=True)
class TensorBucketCodec(Codec):
    """``inner`` (a ``bucket = 0`` codec) applied to each parameter tensor's slice in turn.

    ``label`` is the codec's name (e.g. ``qsgd(s=16, bucket=tensor)``); ``biased`` is the
    inner codec's.  :meth:`variance` is the largest inner factor over the tensor lengths: the
    inner bound holds tensor by tensor, hence for the whole vector.
    """

    inner: SliceCodec
    sizes: tuple[int, ...]
    label: str
    _parts: tuple[tuple[int, int, int, int], ...] = field(init=False, repr=False, compare=False)
    _total: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = []
        lo = pos = 0
        for n in self.sizes:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"{self.label}: tensor size {n!r} must be an integer >= 1")
            nbytes = self.inner.nbytes(int(n))
            parts.append((lo, int(n), pos, nbytes))
            lo += int(n)
            pos += nbytes
        object.__setattr__(self, "_parts", tuple(parts))
        object.__setattr__(self, "_total", pos)
        object.__setattr__(self, "biased", bool(self.inner.biased))

    @property
    def name(self) -> str:
        return self.label

    @property
    def d(self) -> int:
        """The model length: the sum of the tensor sizes."""
        return sum(self.sizes)

    def _check_d(self, d: int) -> None:
        if d != self.d:
            raise ValueError(f"{self.label}: vector length d={d!r} does not match the {len(self.sizes)} "
                             f"parameter tensors, which hold {self.d} values")

    def nbytes(self, d: int) -> int:
        self._check_d(d)
        return self._total

    def variance(self, d: int) -> float:
        self._check_d(d)
        return max(self.inner.variance(n) for n in self.sizes)

    def norm_factor(self, d: int) -> float | None:
        """The largest inner factor over the tensor lengths (the bound holds slice by slice)."""
        self._check_d(d)
        got = [self.inner.norm_factor(n) for n in self.sizes]
        return None if any(k is None for k in got) else max(k for k in got if k is not None)

    def _checked(self, buf: np.ndarray, d: int) -> np.ndarray:
        self._check_d(d)
        buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
        if buf.size != self._total:
            raise ValueError(f"{self.label} message of {buf.size} bytes, expected {self._total} for d={d}")
        return buf

    def encode(self, child: np.ndarray, parent: np.ndarray, key: StreamKey) -> np.ndarray:
        """The concatenated per-tensor messages for ``child - parent``; randomness from ``key``
        (the whole vector's stream, see the module docstring)."""
        child, parent = _as_f32(child), _as_f32(parent)
        if child.shape != parent.shape:
            raise ValueError(f"child {child.shape} and parent {parent.shape} differ in shape")
        self._check_d(child.size)
        k0, k1 = key_words(key)
        out = np.empty(self._total, dtype=np.uint8)
        for lo, n, pos, nbytes in self._parts:
            w0, w1 = shifted_words(k0, k1, lo)
            out[pos : pos + nbytes] = self.inner.encode_words(child[lo : lo + n], parent[lo : lo + n], w0, w1)
        return out

    def encode_add(self, child: np.ndarray, parent: np.ndarray, key: StreamKey, a: np.float32,
                   acc: np.ndarray) -> None:
        """``decode_add(encode(child, parent, key), a, acc)``, tensor by tensor with the inner
        codec's fused path (bit-identical: every coordinate's sum is the inner codec's)."""
        child, parent = _as_f32(child), _as_f32(parent)
        if child.size != acc.size or parent.size != acc.size:
            raise ValueError(f"child {child.size}, parent {parent.size} and accumulator {acc.size} differ in length")
        self._check_d(acc.size)
        k0, k1 = key_words(key)
        for lo, n, _, _ in self._parts:
            w0, w1 = shifted_words(k0, k1, lo)
            self.inner.encode_add_words(child[lo : lo + n], parent[lo : lo + n], w0, w1, a, acc[lo : lo + n])

    def encode_vector(self, x: np.ndarray, gen: np.random.Generator | None) -> np.ndarray:
        """The message for ``x`` itself (parent zero), keyed by a number drawn from ``gen``
        (a deterministic, biased inner codec needs no generator)."""
        if gen is None and not self.biased:
            raise ValueError(f"{self.label} draws random numbers: pass a generator")
        x = _as_f32(x)
        key = () if gen is None else (int(gen.integers(2**63)),)
        return self.encode(x, np.zeros_like(x), key)

    def decode(self, buf: np.ndarray, d: int) -> np.ndarray:
        """The float32 vector of a message: each tensor's part decoded by the inner codec."""
        buf = self._checked(buf, d)
        out = np.empty(d, dtype=np.float32)
        for lo, n, pos, nbytes in self._parts:
            out[lo : lo + n] = self.inner.decode(buf[pos : pos + nbytes], n)
        return out

    def decode_add(self, buf: np.ndarray, a: np.float32, acc: np.ndarray) -> None:
        """``acc += a * decode(buf)``, tensor by tensor with the inner codec's ``decode_add``
        (element-wise, so bit-identical to the dense form)."""
        buf = self._checked(buf, acc.size)
        for lo, n, pos, nbytes in self._parts:
            self.inner.decode_add(buf[pos : pos + nbytes], a, acc[lo : lo + n])
