"""Sub-communicators built once from the rank layout, and the buffer collectives
the aggregation uses.  Everything takes an explicit communicator.

For every layer ``n >= 1`` a rank belongs to at most one node that spans
several ranks (its *spanning node*).  For that node it may hold:

- ``subtree``: all ranks hosting devices of the node (downlink ``Bcast``);
- ``leaders``: the ranks leading at least one child of the node (uplink
  ``Gatherv`` of packed messages).

Both are split with ``key = rank`` so the node's leader (the lowest rank) is
rank 0 of each.  Nodes that lie inside one rank need no communicator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .topology import RankLayout


@dataclass
class LayerComms:
    """Communicators of one layer for one rank (``None`` where not a member)."""

    node: int | None                 # spanning node of this layer, if any
    subtree: MPI.Intracomm | None
    leaders: MPI.Intracomm | None
    leader_counts: np.ndarray | None  # children led by each member of ``leaders``

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
        lead_color = u if rank in kid_leaders else MPI.UNDEFINED
        subtree = comm.Split(sub_color, rank)
        leaders = comm.Split(lead_color, rank)
        counts = None
        if leaders != MPI.COMM_NULL:
            members = sorted(set(kid_leaders))
            counts = np.array([kid_leaders.count(r) for r in members], dtype=np.int64)
        out.append(LayerComms(
            node=u,
            subtree=None if subtree == MPI.COMM_NULL else subtree,
            leaders=None if leaders == MPI.COMM_NULL else leaders,
            leader_counts=counts,
        ))
    return out


def gather_messages(comm: MPI.Intracomm, sendbuf: np.ndarray, counts: np.ndarray, msg_len: int) -> np.ndarray | None:
    """``Gatherv`` the members' packed messages to rank 0 of ``comm``.  Collective.

    Member ``i`` sends ``counts[i]`` messages of ``msg_len`` bytes; rank 0
    receives them concatenated in member order (= child order).
    """
    nbytes = counts * msg_len
    if comm.Get_rank() == 0:
        recv = np.empty(int(nbytes.sum()), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
        comm.Gatherv(sendbuf, [recv, nbytes, displs, MPI.BYTE], root=0)
        return recv
    comm.Gatherv(sendbuf, None, root=0)
    return None


def broadcast_vector(comm: MPI.Intracomm, vec: np.ndarray | None, dim: int) -> np.ndarray:
    """``Bcast`` a float32 vector from rank 0 of ``comm``.  Collective."""
    if comm.Get_rank() != 0:
        vec = np.empty(dim, dtype=np.float32)
    comm.Bcast([vec, MPI.FLOAT], root=0)
    return vec


def agree_on_error(comm: MPI.Intracomm, message: str | None) -> str | None:
    """Collective: if any rank has an error message, every rank returns the
    message of the lowest such rank; else ``None``.  Lets all ranks stop
    together on bad input instead of leaving some waiting in a collective."""
    size = comm.Get_size()
    flag = np.array([comm.Get_rank() if message is not None else size], dtype=np.int64)
    first = np.empty(1, dtype=np.int64)
    comm.Allreduce(flag, first, op=MPI.MIN)
    src = int(first[0])
    if src == size:
        return None
    data = np.frombuffer(message.encode(), dtype=np.uint8).copy() if comm.Get_rank() == src else None
    length = np.array([0 if data is None else data.size], dtype=np.int64)
    comm.Bcast(length, root=src)
    if data is None:
        data = np.empty(int(length[0]), dtype=np.uint8)
    comm.Bcast(data, root=src)
    return data.tobytes().decode(errors="replace")


def sum_over_ranks(comm: MPI.Intracomm, values: np.ndarray) -> np.ndarray:
    """Elementwise float64 sum over ranks.  Collective."""
    out = np.empty_like(values, dtype=np.float64)
    comm.Allreduce(np.ascontiguousarray(values, dtype=np.float64), out, op=MPI.SUM)
    return out


def max_over_ranks(comm: MPI.Intracomm, values: np.ndarray) -> np.ndarray:
    """Elementwise float64 max over ranks.  Collective."""
    out = np.empty_like(values, dtype=np.float64)
    comm.Allreduce(np.ascontiguousarray(values, dtype=np.float64), out, op=MPI.MAX)
    return out
