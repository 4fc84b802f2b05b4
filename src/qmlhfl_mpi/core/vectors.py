"""Where the aggregation's float32 model vectors live (pure numpy; the interface and the host form).

The round's executor (:mod:`qmlhfl_mpi.comm.executor`) never creates, copies or
moves a model vector itself: it asks a :class:`Vectors` backend, chosen once
when the run is built (``train.aggregate_on``).  :class:`HostVectors` keeps them as
numpy arrays on the host, with the compiled codecs of :mod:`.codecs`; the
torch backend of :mod:`qmlhfl_mpi.accel` keeps them as tensors on the
training device (a GPU), so that only packed messages cross to the host.
Either way the vectors are float32, the arithmetic is element-wise in a fixed
order, and MPI only ever sees host bytes.

A backend also supplies each link codec's implementation for its vectors
(:meth:`Vectors.link_codec`): what the executor calls has the methods of
:class:`LinkCodec`, which every :class:`~.codecs.Codec` already has.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .codecs import Codec, StreamKey

__all__ = ["HostVectors", "LinkCodec", "Vectors", "through_host"]


class LinkCodec(Protocol):
    """A codec as the executor uses it: vectors of the backend's kind in, host bytes out
    (and back).  ``a`` is a float32 weight; ``acc`` is updated in place."""

    def nbytes(self, d: int) -> int: ...

    def encode(self, child: Any, parent: Any, key: StreamKey) -> np.ndarray: ...

    def encode_add(self, child: Any, parent: Any, key: StreamKey, a: np.float32, acc: Any) -> None: ...

    def decode(self, buf: np.ndarray, d: int) -> Any: ...

    def decode_add(self, buf: np.ndarray, a: np.float32, acc: Any) -> None: ...


def through_host(codec: LinkCodec, d: int) -> bool:
    """Whether a backend's ``codec`` moves float vectors of length ``d`` through the host (a device
    backend's fallback; such a codec has a ``through_host(d)`` method saying so)."""
    check = getattr(codec, "through_host", None)
    return bool(check(d)) if callable(check) else False


class Vectors(Protocol):
    """A backend for float32 model vectors: creation, copies, the host boundary, its codecs."""

    @property
    def name(self) -> str:
        """Where the vectors live, for logs and the results file (``host``, ``torch:cuda:0``, ...)."""
        ...

    def zeros(self, d: int) -> Any:
        """A new zero vector of length ``d``."""
        ...

    def from_host(self, x: np.ndarray) -> Any:
        """The float32 host vector ``x`` as a vector of this backend (a copy unless on the host)."""
        ...

    def to_host(self, x: Any) -> np.ndarray:
        """The vector ``x`` as a float32 numpy array (the caller does not modify it)."""
        ...

    def copy(self, x: Any) -> Any:
        """An independent copy of ``x``."""
        ...

    def link_codec(self, codec: Codec) -> LinkCodec:
        """``codec``'s implementation for this backend's vectors (the same bytes and sums)."""
        ...


class HostVectors:
    """Numpy float32 vectors on the host; every codec is its own implementation."""

    name = "host"

    def zeros(self, d: int) -> np.ndarray:
        return np.zeros(d, dtype=np.float32)

    def from_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def copy(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=np.float32)

    def link_codec(self, codec: Codec) -> LinkCodec:
        return codec
