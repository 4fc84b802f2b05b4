"""Which edge server every device sits under in one round: the tree of the moment (pure).

The tree's upper layers (edge servers and above) are fixed for the run; devices
may sit under another edge server than the one the tree gives them (mobility,
an edge server that failed) or under none for a round.  A :class:`Membership`
records, per device, the layer-1 node it sits under in one round (``-1``: it
sits the round out).  Devices never move between ranks: a device under an edge
led by another rank trains on its own rank, which sends its message to the
edge's leader point to point (:mod:`qmlhfl_mpi.comm.executor`).

Node sizes follow the membership: an edge's size is its devices (or their
training samples) of the moment, an upper node's the sum over its edges, so
the weights ``a(c) = D(c) / D(u)`` are those of the tree of the moment.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .topology import Tree

__all__ = ["Membership"]


@dataclass(frozen=True, eq=False)
class Membership:
    """``edge_of[d]``: the layer-1 node device ``d`` sits under in the round (``-1``: none); ``num_edges`` nodes."""

    edge_of: np.ndarray
    num_edges: int
    _order: np.ndarray = field(init=False, repr=False)
    _bounds: np.ndarray = field(init=False, repr=False)
    _sizes: dict[bool, np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        edge_of = np.asarray(self.edge_of, dtype=np.int64)
        if edge_of.ndim != 1:
            raise ValueError(f"edge_of must be one edge id per device, got shape {edge_of.shape}")
        if edge_of.size and (edge_of.min() < -1 or edge_of.max() >= self.num_edges):
            bad = int(edge_of[(edge_of < -1) | (edge_of >= self.num_edges)][0])
            raise ValueError(f"edge id {bad} out of range: expected -1 (sits out) or 0..{self.num_edges - 1}")
        # by edge, devices ascending within an edge (a radix sort on 16-bit keys when the edges fit: 5x faster)
        keys = (edge_of + 1).astype(np.uint16) if self.num_edges < (1 << 16) - 1 else edge_of
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(edge_of + 1, minlength=self.num_edges + 1)  # [sitting out, edge 0, edge 1, ...]
        object.__setattr__(self, "edge_of", edge_of)
        object.__setattr__(self, "_order", order[int(counts[0]):].astype(np.int64))
        object.__setattr__(self, "_bounds", np.concatenate([[0], np.cumsum(counts[1:])]).astype(np.int64))

    @classmethod
    def of_tree(cls, tree: Tree) -> Membership:
        """Every device under the edge the tree gives it."""
        return cls(np.repeat(np.arange(tree.num_nodes(1), dtype=np.int64), np.diff(tree.starts[1])), tree.num_nodes(1))

    def members(self, u: int) -> np.ndarray:
        """The devices under edge ``u``, ascending (int64)."""
        return self._order[self._bounds[u] : self._bounds[u + 1]]

    def edge_sizes(self, samples: np.ndarray | None = None) -> np.ndarray:
        """Float64 size of every edge: its devices, or their training ``samples`` (the run's, the same array
        every call: kept after the first)."""
        got = self._sizes.get(samples is None)
        if got is None:
            got = self._sizes[samples is None] = self._edge_sizes(samples)
        return got

    def _edge_sizes(self, samples: np.ndarray | None) -> np.ndarray:
        kept = self.edge_of >= 0
        weights = None if samples is None else np.asarray(samples, dtype=np.float64)[kept]
        return np.bincount(self.edge_of[kept], weights=weights, minlength=self.num_edges).astype(np.float64)

    def node_sizes(self, tree: Tree, n: int, samples: np.ndarray | None = None) -> np.ndarray:
        """Float64 size of every node of layer ``n >= 1`` in this round: the sum of its edges' sizes."""
        sizes = self.edge_sizes(samples)
        if n == 1:
            return sizes
        edge_node = np.searchsorted(tree.starts[n], tree.starts[1][:-1], side="right") - 1
        return np.bincount(edge_node, weights=sizes, minlength=tree.num_nodes(n)).astype(np.float64)

    def moved(self, tree: Tree) -> np.ndarray:
        """The devices not under the edge the tree gives them (sitting out included), ascending."""
        return np.flatnonzero(self.edge_of != Membership.of_tree(tree).edge_of)
