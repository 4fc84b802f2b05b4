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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from .session import Session

Record = Mapping[str, Any]  # one global round: every metric that goes to the HDF5 file


@dataclass(frozen=True)
class RunSummary:
    """How a run ended: ``completed``, ``preempted`` (stopped by a signal or a callback after a checkpoint:
    resume it), ``diverged`` or ``failed``."""

    status: str
    rounds_done: int
    final_accuracy: float
    path: str
    message: str = ""


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


def configured_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks the config asks for: ``output.csv``, ``output.tensorboard``, ``callbacks`` (references
    loaded as plug-ins); :class:`~qmlhfl_mpi.core.registry.PluginError` names a bad one."""
    from ..config import callback_specs
    from ..core.registry import PluginError, load_reference
    from .logs import CSVLog, TensorBoardLog, csv_path

    out: list[Callback] = []
    if cfg.output.csv:
        out.append(CSVLog(csv_path(cfg.output.path)))
    if cfg.output.tensorboard:
        out.append(TensorBoardLog(cfg.output.tensorboard))
    for ref, args in callback_specs(cfg.callbacks):
        factory = load_reference(ref)
        if not callable(factory):
            raise PluginError(f"callback {ref!r}: {factory!r} is not callable; name a Callback subclass or a "
                              "function returning a Callback")
        try:
            cb = factory(**args)
        except Exception as e:  # noqa: BLE001 - anything the user's constructor raises
            raise PluginError(f"callback {ref!r} with args {args!r}: {type(e).__name__}: {e}") from None
        if not isinstance(cb, Callback):
            raise PluginError(f"callback {ref!r} gave {type(cb).__name__}, not a qmlhfl_mpi.Callback; "
                              "subclass qmlhfl_mpi.Callback")
        out.append(cb)
    return out
