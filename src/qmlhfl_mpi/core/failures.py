"""Edge servers that fail and recover (pure): a view over the tree of the moment.

An edge server (a layer-1 node) is *down* during its intervals ``[start, end)``, counted in global rounds
(``unit: rounds``: down in round ``t`` when ``start <= t < end``) or in virtual seconds (``unit: seconds``:
down in a round that starts at a virtual time ``t0`` with ``start <= t0 < end``; the clock of docs/system.md).
While it is down, the devices under it either

* join its *fallback*: an edge named in the interval, else (``fallback: nearest``) the nearest alive sibling,
  the alive edge under the same parent whose id is closest (ties: the lower id); or
* sit the round out (``fallback: sit_out``, an interval's fallback ``-1``, or no alive edge to go to).

A named fallback that is down itself sends its guests to *its* nearest alive sibling (``nearest``) or out.
The view is applied round by round on top of the devices' own edges (mobility's): a device returns when its
edge recovers.  A down edge holds no device, so it takes no part in its parent's aggregations and sends
nothing; its server optimiser's state and its error-feedback residual are kept (a server that reboots from
its disk) and used again when it recovers (docs/algorithms.md, "Edge servers that fail").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FALLBACKS", "UNITS", "EdgeFailures", "Outage"]

UNITS = ("rounds", "seconds")
FALLBACKS = ("nearest", "sit_out")


@dataclass(frozen=True)
class Outage:
    """Edge ``edge`` is down for ``start <= x < end``; its devices go to ``fallback`` (an edge id, -1: they
    sit out, ``None``: the rule of :attr:`EdgeFailures.fallback`)."""

    edge: int
    start: float
    end: float
    fallback: int | None = None


class EdgeFailures:
    """Outages of edge servers (see the module doc); ``parent_of[e]`` is edge ``e``'s parent node (its
    siblings share it)."""

    def __init__(self, outages: Sequence[Outage], num_edges: int, parent_of: np.ndarray, unit: str = "rounds",
                 fallback: str = "nearest") -> None:
        if unit not in UNITS:
            raise ValueError(f"failures unit = {unit!r}: expected one of {', '.join(UNITS)}")
        if fallback not in FALLBACKS:
            raise ValueError(f"failures fallback = {fallback!r}: expected one of {', '.join(FALLBACKS)}")
        for o in outages:
            if not 0 <= o.edge < num_edges:
                raise ValueError(f"failures: edge server {o.edge} out of range (valid: 0..{num_edges - 1})")
            if not (np.isfinite(o.start) and o.start >= 0 and o.end > o.start):
                raise ValueError(f"failures: interval [{o.start:g}, {o.end:g}) of edge server {o.edge}: expected "
                                 "0 <= start < end")
            if o.fallback is not None and not -1 <= o.fallback < num_edges:
                raise ValueError(f"failures: fallback {o.fallback} of edge server {o.edge} out of range (valid: -1 "
                                 f"to sit out, or 0..{num_edges - 1})")
            if o.fallback == o.edge:
                raise ValueError(f"failures: edge server {o.edge} cannot be its own fallback; name another edge, -1 "
                                 "(its devices sit out) or leave it out (the nearest alive sibling)")
        self.outages, self.num_edges, self.unit, self.fallback = tuple(outages), num_edges, unit, fallback
        self.parent_of = np.asarray(parent_of, dtype=np.int64)

    def __bool__(self) -> bool:
        return bool(self.outages)

    def active(self, round_: int, t0: float) -> list[Outage]:
        """The outages in force in round ``round_``, which starts at virtual time ``t0``."""
        x = float(round_) if self.unit == "rounds" else t0
        return [o for o in self.outages if o.start <= x < o.end]

    def down(self, round_: int, t0: float) -> np.ndarray:
        """Bool per edge: down in round ``round_`` (starting at ``t0``)."""
        out = np.zeros(self.num_edges, dtype=bool)
        for o in self.active(round_, t0):
            out[o.edge] = True
        return out

    def nearest_alive(self, edge: int, down: np.ndarray) -> int:
        """The alive sibling of ``edge`` with the closest id (ties: the lower), -1 if none."""
        sib = np.flatnonzero((self.parent_of == self.parent_of[edge]) & ~down)
        if sib.size == 0:
            return -1
        return int(sib[np.argmin(np.abs(sib - edge))])  # argmin takes the first: the lower id on a tie

    def apply(self, edge_of: np.ndarray, round_: int, t0: float) -> np.ndarray:
        """The edges of the moment: ``edge_of`` (each device's own, -1 out) with the down edges' devices sent to
        their fallbacks (a new array; ``edge_of`` itself when nothing is down)."""
        active = self.active(round_, t0)
        if not active:
            return edge_of
        down = self.down(round_, t0)
        named = {o.edge: o.fallback for o in active if o.fallback is not None}  # the last one named wins
        target = np.arange(self.num_edges, dtype=np.int64)
        for e in np.flatnonzero(down).tolist():
            to = named.get(e, -1 if self.fallback == "sit_out" else self.nearest_alive(e, down))
            if to >= 0 and down[to]:  # the named fallback is down too
                to = -1 if self.fallback == "sit_out" else self.nearest_alive(to, down)
            target[e] = to
        out = edge_of.copy()
        inside = edge_of >= 0
        out[inside] = target[edge_of[inside]]
        return out
