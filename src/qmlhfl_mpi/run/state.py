"""The per-node state (server optimisers' vectors, error-feedback residuals) between ranks and checkpoints.

Every entry lives on the rank that leads its node or sender
(:meth:`~qmlhfl_mpi.comm.executor.RoundExecutor.owner`); a checkpoint holds
them all.  Collective over the run's communicator.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..comm.collectives import broadcast_vector, gather_named_vectors, scatter_named_vectors, sum_over_ranks
from ..comm.executor import RoundExecutor
from ..core.exitcodes import EXIT_USAGE
from .agreement import Agreement
from .preflight import Start

__all__ = ["gather_state", "resume_from", "scatter_state", "state_problem"]


def state_problem(executor: RoundExecutor, state: dict[str, np.ndarray], dim: int) -> str | None:
    """What is wrong with a checkpoint's per-node state for this run, if anything (on rank 0)."""
    for name, arr in state.items():
        try:
            executor.owner(name)
        except (ValueError, IndexError):
            return (f"the checkpoint's state {name!r} is of no known kind (server.<n>.<u>.<name>, residual.<n>.<c>, "
                    "dual.1.<i>, "
                    "tier.<n>.<u>.<model|start>, held.<n>.<c>.<k>, buffer.<n>.<u>.<i>.<c>.<k>)")
        if np.asarray(arr).size != dim:
            return f"the checkpoint's state {name!r} has {np.asarray(arr).size} values but the model {dim}"
    return None


def scatter_state(comm: Any, agreement: Agreement, executor: RoundExecutor, state: dict[str, np.ndarray],
                  dim: int) -> dict[str, np.ndarray]:
    """Rank 0's checkpointed per-node state, each entry to the rank that keeps it now.  Collective."""
    rank, size = comm.Get_rank(), comm.Get_size()
    problem = state_problem(executor, state, dim) if rank == 0 else None
    agreement.raise_agreed(f"{EXIT_USAGE}|{problem}" if problem else None)
    per_rank: list[dict[str, np.ndarray]] | None = None
    if rank == 0:
        per_rank = [{} for _ in range(size)]
        for name, arr in state.items():
            per_rank[executor.owner(name)][name] = np.asarray(arr).reshape(-1)
    return scatter_named_vectors(comm, per_rank, dim)


def gather_state(comm: Any, executor: RoundExecutor, dim: int) -> dict[str, np.ndarray] | None:
    """Every rank's per-node state on rank 0 (``None`` elsewhere).  Collective."""
    return gather_named_vectors(comm, executor.state(), dim)


def resume_from(comm: Any, agreement: Agreement, executor: RoundExecutor, start: Start, dim: int) -> Start:
    """Every rank's share of rank 0's ``start`` (a fresh start, or a checkpoint's): the rounds done, the cloud
    model, and the per-node state each rank keeps, loaded into ``executor``.  Collective."""
    rank = comm.Get_rank()
    done = int(sum_over_ranks(comm, np.array([start.rounds_done]))[0])
    if not done:
        return Start()
    bad = rank == 0 and start.model is not None and start.model.size != dim
    agreement.raise_agreed(f"{EXIT_USAGE}|the checkpoint's model has {start.model.size} parameters but the "
                           f"configured model has {dim}" if bad and start.model is not None else None)
    model = broadcast_vector(comm, start.model if rank == 0 else None, dim)
    state = scatter_state(comm, agreement, executor, start.state or {}, dim)
    agreement.step(lambda: executor.load_state(state), (ValueError,), stage="loading the checkpoint's state")
    return Start(done, model, start.state, start.metrics, start.rebuild)
