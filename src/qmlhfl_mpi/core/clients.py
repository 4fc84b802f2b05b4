"""The devices a rank hosts, as the round's executor sees them (the protocol; pure).

The executor (:mod:`qmlhfl_mpi.comm.executor`) trains through a
:class:`Clients`; :mod:`qmlhfl_mpi.learning.clients` implements it with
local SGD, one device at a time or in batches.  Tests give their own.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

__all__ = ["Clients"]


class Clients(Protocol):
    """Local training of the devices a rank hosts."""

    def train(self, v: Any, devices: Sequence[int], round_: int, calls: Sequence[int], group: range
              ) -> Iterator[tuple[Any, float, int]]:
        """Each device of ``devices`` (this rank's, all in ``group``: the devices of one layer-1 node) trained
        from the model ``v`` (a vector of the aggregation's backend) with its training call ``calls[k]``:
        ``(vector, sum of step losses, steps)`` per device, in order."""
        ...
