"""The devices a rank hosts, as the round's executor sees them (the protocol; pure).

The executor (:mod:`qmlhfl_mpi.comm.executor`) trains through a
:class:`Clients`; :mod:`qmlhfl_mpi.learning.clients` implements it with
local SGD, one device at a time or in batches.  Tests give their own.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["Clients"]


class Clients(Protocol):
    """Local training of the devices a rank hosts."""

    def train(self, v: Any, devices: Sequence[int], round_: int, calls: Sequence[int], peers: np.ndarray,
              prox: tuple[float, Callable[[int], np.ndarray]] | None = None) -> Iterator[tuple[Any, float, int]]:
        """Each device of ``devices`` (this rank's share of ``peers``: every device, on any rank, that trains in
        the same layer-1 aggregation, ascending) trained from the model ``v`` (a vector of the aggregation's
        backend) with its training call ``calls[k]``: ``(vector, sum of step losses, steps)`` per device, in
        order.  ``peers`` is the same on every rank, so a batched implementation can lay its batches out by it.
        ``prox = (mu, anchor_of)``: each device's proximal term ``mu (w - anchor_of(device))`` (ADMM)."""
        ...
