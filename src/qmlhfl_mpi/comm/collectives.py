"""Buffer collectives of the engine (``Ibcast``, ``Allreduce`` on numpy arrays),
the point-to-point message flow of an aggregation, and a wait that does not spin for long.

Everything takes an explicit communicator; the collectives are collective over it.

MPICH (and most MPI libraries) busy-poll inside blocking calls: a rank waiting
in ``Bcast`` for its parent's new model burns a core, which costs a rank that
shares the core (oversubscribed runs) the whole wait.  :func:`wait` drives
the request with ``Test`` and, after 1 ms of spinning, sleeps between tests
for a tenth of the time waited so far (at most 1 ms): a long wait then costs
almost no CPU, and ends at most ~10% (or 1 ms) late.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from mpi4py import MPI

from .watchdog import Watchdog

SPIN_S = 1e-3       # spin this long before sleeping between tests
MAX_SLEEP_S = 1e-3  # longest sleep between two tests


def wait(req: MPI.Request, guard: Watchdog | None = None) -> None:
    """Complete ``req`` like ``req.Wait()``, without spinning for more than ~1 ms; with a
    ``guard``, enforce its round deadline meanwhile (:class:`.watchdog.RoundTimeout`)."""
    if req.Test():
        return
    t0 = time.perf_counter()
    while not req.Test():
        if guard is not None:
            guard.poll()
        waited = time.perf_counter() - t0
        if waited > SPIN_S:
            time.sleep(min(MAX_SLEEP_S, waited / 10))


def post_receives(comm: MPI.Intracomm, counts: Sequence[int] | np.ndarray, msg_len: int, tag: int
                  ) -> list[tuple[np.ndarray, MPI.Request]]:
    """On rank 0 of ``comm``: one ``Irecv`` of ``msg_len`` bytes for each of the ``counts[r]``
    messages of every other member ``r``, in member order (= child order)."""
    out = []
    for r in range(1, comm.Get_size()):
        for _ in range(int(counts[r])):
            buf = np.empty(msg_len, dtype=np.uint8)
            out.append((buf, comm.Irecv([buf, MPI.BYTE], source=r, tag=tag)))
    return out


def send_messages(comm: MPI.Intracomm, parts: Sequence[np.ndarray], tag: int, guard: Watchdog | None = None
                  ) -> None:
    """On a member other than rank 0: send ``parts`` (in order) to rank 0 and wait (:func:`wait`)."""
    reqs = [comm.Isend([p, MPI.BYTE], dest=0, tag=tag) for p in parts]
    for req in reqs:
        wait(req, guard)


def broadcast_vector(comm: MPI.Intracomm, vec: np.ndarray | None, dim: int, guard: Watchdog | None = None,
                     root: int = 0) -> np.ndarray:
    """Broadcast a float32 vector from rank ``root`` of ``comm`` (``Ibcast`` and :func:`wait`).  Collective."""
    if comm.Get_rank() != root:
        vec = np.empty(dim, dtype=np.float32)
    wait(comm.Ibcast([vec, MPI.FLOAT], root=root), guard)
    assert vec is not None
    return vec


def broadcast_bytes(comm: MPI.Intracomm, buf: np.ndarray | None, nbytes: int, guard: Watchdog | None = None
                    ) -> np.ndarray:
    """Broadcast a ``uint8`` message of ``nbytes`` bytes from rank 0 of ``comm`` (``Ibcast`` and
    :func:`wait`).  Collective."""
    if comm.Get_rank() != 0:
        buf = np.empty(nbytes, dtype=np.uint8)
    assert buf is not None
    wait(comm.Ibcast([buf, MPI.BYTE], root=0), guard)
    return buf


def gather_named_vectors(comm: MPI.Intracomm, entries: dict[str, np.ndarray], dim: int
                         ) -> dict[str, np.ndarray] | None:
    """Every rank's named float32 vectors of length ``dim`` on rank 0 (``None`` elsewhere): the
    names as small objects, the values with one ``Gatherv``.  Collective."""
    names = sorted(entries)
    send = (np.concatenate([np.asarray(entries[k], dtype=np.float32).reshape(-1) for k in names])
            if names else np.zeros(0, dtype=np.float32))
    all_names = comm.gather(names, root=0)
    if comm.Get_rank() != 0:
        comm.Gatherv(send, None, root=0)
        return None
    assert all_names is not None
    counts = np.array([len(n) * dim for n in all_names], dtype=np.int64)
    recv = np.empty(int(counts.sum()), dtype=np.float32)
    comm.Gatherv(send, [recv, counts, MPI.FLOAT], root=0)
    flat = [k for n in all_names for k in n]
    return {k: recv[i * dim : (i + 1) * dim].copy() for i, k in enumerate(flat)}


def gather_rows(comm: MPI.Intracomm, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Every rank's ``(ids, rows)`` (int64 ids, one int64 row each, of one width on every rank) on rank 0, sorted by
    id (``None`` elsewhere); for sparse per-device facts (class counts of the devices made so far): the counts as
    small objects, the arrays with ``Gatherv``.  Collective."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    width = rows.shape[1] if rows.ndim == 2 else 1
    counts = np.array(comm.gather(int(ids.size), root=0) or [], dtype=np.int64)  # one small int per rank
    if comm.Get_rank() != 0:
        comm.Gatherv(ids, None, root=0)
        comm.Gatherv(rows.reshape(-1), None, root=0)
        return None
    all_ids = np.empty(int(counts.sum()), dtype=np.int64)
    all_rows = np.empty((all_ids.size, width), dtype=np.int64)
    comm.Gatherv(ids, [all_ids, counts, MPI.INT64_T], root=0)
    comm.Gatherv(rows.reshape(-1), [all_rows.reshape(-1), counts * width, MPI.INT64_T], root=0)
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], all_rows[order]


def scatter_named_vectors(comm: MPI.Intracomm, per_rank: Sequence[dict[str, np.ndarray]] | None, dim: int
                          ) -> dict[str, np.ndarray]:
    """Rank 0's ``per_rank[r]`` (named float32 vectors of length ``dim``) to rank ``r``: the names as
    small objects, the values with one ``Scatterv``.  Collective."""
    send = None
    if comm.Get_rank() == 0:
        assert per_rank is not None and len(per_rank) == comm.Get_size()
        names_of = [sorted(d) for d in per_rank]
        counts = np.array([len(n) * dim for n in names_of], dtype=np.int64)
        parts = [np.asarray(per_rank[r][k], dtype=np.float32).reshape(-1) for r, n in enumerate(names_of) for k in n]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        send = [flat, counts, MPI.FLOAT]
    else:
        names_of = None
    names = comm.scatter(names_of, root=0)
    recv = np.empty(len(names) * dim, dtype=np.float32)
    comm.Scatterv(send, recv, root=0)
    return {k: recv[i * dim : (i + 1) * dim].copy() for i, k in enumerate(names)}


def agree_on_error(comm: MPI.Intracomm, message: str | None) -> str | None:
    """Collective: if any rank has an error message, every rank returns the
    message of the lowest such rank; else ``None``.  Lets all ranks stop
    together on bad input instead of leaving some waiting in a collective."""
    return agree(comm, message)[0]


def _allreduce(comm: MPI.Intracomm, values: np.ndarray, op: MPI.Op, guard: Watchdog | None) -> np.ndarray:
    send = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty_like(send)
    if guard is None:
        comm.Allreduce(send, out, op=op)
    else:
        wait(comm.Iallreduce(send, out, op=op), guard)
    return out


def sum_over_ranks(comm: MPI.Intracomm, values: np.ndarray, guard: Watchdog | None = None) -> np.ndarray:
    """Elementwise float64 sum over ranks.  Collective."""
    return _allreduce(comm, values, MPI.SUM, guard)


def max_over_ranks(comm: MPI.Intracomm, values: np.ndarray, guard: Watchdog | None = None) -> np.ndarray:
    """Elementwise float64 max over ranks.  Collective."""
    return _allreduce(comm, values, MPI.MAX, guard)


def agree(comm: MPI.Intracomm, message: str | None, stop: bool = False, guard: Watchdog | None = None
          ) -> tuple[str | None, bool]:
    """Collective: :func:`agree_on_error` and whether any rank asked to stop, in one step.

    Returns ``(message of the lowest rank that has one, or None; any rank's stop)``.
    """
    size = comm.Get_size()
    flag = np.array([comm.Get_rank() if message is not None else size, -int(bool(stop))], dtype=np.int64)
    red = np.empty(2, dtype=np.int64)
    if guard is None:
        comm.Allreduce(flag, red, op=MPI.MIN)
    else:
        wait(comm.Iallreduce(flag, red, op=MPI.MIN), guard)
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
