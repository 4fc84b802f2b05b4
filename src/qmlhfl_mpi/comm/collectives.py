"""Buffer collectives of the engine (``Gatherv``, ``Bcast``, ``Allreduce`` on numpy arrays).

Everything takes an explicit communicator and is collective over it.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI


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
    assert vec is not None
    return vec


def agree_on_error(comm: MPI.Intracomm, message: str | None) -> str | None:
    """Collective: if any rank has an error message, every rank returns the
    message of the lowest such rank; else ``None``.  Lets all ranks stop
    together on bad input instead of leaving some waiting in a collective."""
    return agree(comm, message)[0]


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


def agree(comm: MPI.Intracomm, message: str | None, stop: bool = False) -> tuple[str | None, bool]:
    """Collective: :func:`agree_on_error` and whether any rank asked to stop, in one step.

    Returns ``(message of the lowest rank that has one, or None; any rank's stop)``.
    """
    size = comm.Get_size()
    flag = np.array([comm.Get_rank() if message is not None else size, -int(bool(stop))], dtype=np.int64)
    red = np.empty(2, dtype=np.int64)
    comm.Allreduce(flag, red, op=MPI.MIN)
    src, any_stop = int(red[0]), bool(red[1] < 0)
    if src == size:
        return None, any_stop
    return _broadcast_text(comm, message if comm.Get_rank() == src else None, src), any_stop


def _broadcast_text(comm: MPI.Intracomm, text: str | None, root: int) -> str:
    data = np.frombuffer(text.encode(), dtype=np.uint8).copy() if comm.Get_rank() == root and text is not None else None
    length = np.array([0 if data is None else data.size], dtype=np.int64)
    comm.Bcast(length, root=root)
    if data is None:
        data = np.empty(int(length[0]), dtype=np.uint8)
    comm.Bcast(data, root=root)
    return data.tobytes().decode(errors="replace")
