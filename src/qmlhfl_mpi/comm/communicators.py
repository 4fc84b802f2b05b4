"""Sub-communicators built once from the rank layout.  Everything takes an explicit communicator.

For every layer ``n >= 1`` a rank belongs to at most one node that spans
several ranks (its *spanning node*).  For that node it may hold:

- ``subtree``: all ranks hosting devices of the node (downlink ``Bcast``);
- ``leaders``: the ranks leading at least one child of the node (uplink
  point-to-point messages of packed bytes to the node's leader).

Both are split with ``key = rank`` so the node's leader (the lowest rank) is
rank 0 of each.  Nodes that lie inside one rank need no communicator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
from mpi4py import MPI

from ..core.topology import RankLayout

Intracomm = MPI.Intracomm
"""The communicator type, for layers that take one without importing mpi4py themselves."""


@dataclass
class LayerComms:
    """Communicators of one layer for one rank (``None`` where not a member)."""

    node: int | None                 # spanning node of this layer, if any
    subtree: MPI.Intracomm | None
    leaders: MPI.Intracomm | None
    leader_counts: np.ndarray | None  # children led by each member of ``leaders``
    kid_leaders: tuple[int, ...] = ()  # rank (of the full communicator) leading each child of ``node``
    members: tuple[int, ...] = ()      # ranks of the members of ``leaders``, in its rank order

    def counts_for(self, kids: np.ndarray) -> np.ndarray:
        """Messages each member of ``leaders`` sends when only the children at positions ``kids`` send."""
        index = {r: i for i, r in enumerate(self.members)}
        out = np.zeros(len(self.members), dtype=np.int64)
        for k in kids:
            out[index[self.kid_leaders[int(k)]]] += 1
        return out

    def free(self) -> None:
        for c in (self.subtree, self.leaders):
            if c is not None:
                c.Free()


def build_layer_comms(comm: MPI.Intracomm, layout: RankLayout) -> list[LayerComms | None]:
    """Split ``comm`` into the per-layer communicators.  Collective over ``comm``.

    Returns a list indexed by layer (entry 0 is ``None``).
    """
    if comm.Get_size() != layout.num_ranks:
        raise ValueError(f"communicator has {comm.Get_size()} ranks but the layout was built for {layout.num_ranks}")
    rank = comm.Get_rank()
    tree = layout.tree
    out: list[LayerComms | None] = [None]
    for n in range(1, tree.N + 1):
        u = layout.spanning_node(rank, n)
        sub_color = u if u is not None else MPI.UNDEFINED
        kids = tree.children(n, u) if u is not None else range(0)
        kid_leaders = [layout.leader(n - 1, c) for c in kids]
        lead_color = u if u is not None and rank in kid_leaders else MPI.UNDEFINED  # kid_leaders is empty when u is None
        # Split of an Intracomm returns an Intracomm (the stubs say Comm)
        subtree = cast(MPI.Intracomm, comm.Split(sub_color, rank))
        leaders = cast(MPI.Intracomm, comm.Split(lead_color, rank))
        counts = None
        members: list[int] = []
        if leaders != MPI.COMM_NULL:
            members = sorted(set(kid_leaders))
            counts = np.array([kid_leaders.count(r) for r in members], dtype=np.int64)
        out.append(LayerComms(
            node=u,
            subtree=None if subtree == MPI.COMM_NULL else subtree,
            leaders=None if leaders == MPI.COMM_NULL else leaders,
            leader_counts=counts,
            kid_leaders=tuple(kid_leaders),
            members=tuple(members),
        ))
    return out
