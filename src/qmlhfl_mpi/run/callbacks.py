"""The callback interface of :class:`~qmlhfl_mpi.run.session.Session`.

Every hook is called on every rank, at a round boundary (outside any
collective); a callback that only wants rank 0 checks ``session.rank``.
Returning ``True`` from :meth:`Callback.on_round_end` on any rank asks the run
to stop: the ranks agree on it, the session writes a checkpoint and the run
ends ``preempted`` (resume it with ``resume=True`` / ``--resume``).

A hook that raises stops the run on every rank with one message: a
:class:`~qmlhfl_mpi.run.errors.RunError` keeps its exit code, an ``OSError``
gives exit 74, anything else exit 1.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .session import RunSummary, Session

Record = Mapping[str, Any]  # one global round: every metric that goes to the HDF5 file


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    def on_run_start(self, session: Session) -> None:
        """Before the first round (after a resume: before the first new round)."""

    def on_round_end(self, session: Session, record: Record) -> bool | None:
        """After each global round; ``record`` has every metric of the round.
        Return ``True`` to ask the run to stop after this round."""
        return None

    def on_run_end(self, session: Session, summary: RunSummary) -> None:
        """After the last round, with the run's summary (also after a stop or divergence)."""
