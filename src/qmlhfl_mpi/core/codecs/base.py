"""The codec interface: what one link does to a model difference (pure numpy).

A codec turns the difference between a child's model and its parent's model
into a ``uint8`` message whose length is a pure function of the model length
``d`` (:meth:`Codec.nbytes`), and adds a weighted decoded message into the
parent's float32 accumulator.  Randomness comes only from the stream key it
is given, ``(seed, QUANT, layer, child, round, call)`` (see
:mod:`qmlhfl_mpi.core.rng`), so every rank that encodes a given child's message
produces the same bytes.

To add a codec: write a module with a :class:`Codec` subclass and a factory
``f(levels, bucket, **args) -> Codec``, and register the factory in
:mod:`qmlhfl_mpi.core.codecs` (or name it as ``module:attr`` in
``quantizer.kind``).  The theory (``q_n``), the planner, ``check`` and the
results file ask the codec objects for their sizes and variance factors.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from .. import rng

__all__ = ["Codec", "StreamKey"]

StreamKey = Sequence[int]  # (seed, purpose, layer, child, round, call)


class Codec(ABC):
    """One link's uplink codec.

    ``biased`` codecs (``E[decode(encode(x))] != x``) are outside the
    convergence bound; :meth:`variance` is then meaningless and ``check``
    says so.
    """

    biased: bool = False

    @property
    @abstractmethod
    def name(self) -> str:
        """Short description for logs and reports, e.g. ``qsgd(s=16, bucket=512)``."""

    @abstractmethod
    def nbytes(self, d: int) -> int:
        """Exact byte length of the message for a model of ``d`` parameters."""

    @abstractmethod
    def variance(self, d: int) -> float:
        """Variance factor ``q``: ``E||Q(x) - x||^2 <= q ||x||^2`` (0 for lossless)."""

    def norm_factor(self, d: int) -> float | None:
        """``kappa`` with ``||decode(encode(x))|| <= kappa ||x||`` for every ``x`` and every draw (differential
        privacy's sensitivity through the codec, docs/privacy.md); ``None``: no such bound is known."""
        return None

    @abstractmethod
    def encode_vector(self, x: np.ndarray, gen: np.random.Generator | None) -> np.ndarray:
        """Message for the float32 vector ``x``, drawing randomness only from ``gen``."""

    @abstractmethod
    def decode(self, buf: np.ndarray, d: int) -> np.ndarray:
        """The float32 vector a message of :meth:`nbytes` ``(d)`` bytes stands for."""

    def encode(self, child: np.ndarray, parent: np.ndarray, key: StreamKey) -> np.ndarray:
        """Message for the difference ``child - parent``; randomness from ``key``."""
        return self.encode_vector(child - parent, rng.generator(key))

    def encode_add(self, child: np.ndarray, parent: np.ndarray, key: StreamKey, a: np.float32,
                   acc: np.ndarray) -> None:
        """``decode_add(encode(child, parent, key), a, acc)``: a child whose parent is on the same
        rank.  A codec may fuse the two (skipping the bits) if the sum stays bit-identical."""
        self.decode_add(self.encode(child, parent, key), a, acc)

    def decode_add(self, buf: np.ndarray, a: np.float32, acc: np.ndarray) -> None:
        """``acc += a * decode(buf)`` in float32 (the parent's weighted sum, in child order)."""
        dec = self.decode(buf, acc.size)
        dec *= np.float32(a)
        acc += dec
