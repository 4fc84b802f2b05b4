"""Stopping cleanly on a signal: SIGTERM / SIGUSR1 (the batch system's warning
signals) and, in the CLI, SIGINT (Ctrl-C): a callback that asks to stop."""
from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .callbacks import Callback, Record

if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import RunSummary
    from .session import Session

log = logging.getLogger(__name__)

STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)
"""What :class:`SignalStop` catches by default: the batch system's warning signals."""
CLI_STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""What the CLI catches: also SIGINT, which Ctrl-C at ``mpiexec`` sends to every rank."""


class SignalStop(Callback):
    """Installs handlers for ``signals`` when created (so a signal during start-up
    counts too) and asks the run to stop at the next round boundary once one
    arrived: the run writes its checkpoint and ends ``preempted`` (the CLI exits
    75, ``EXIT_PREEMPTED``; continue with ``--resume``).

    The default ``signals`` are SIGTERM and SIGUSR1.  The CLI passes
    :data:`CLI_STOP_SIGNALS`, which adds SIGINT: Ctrl-C at ``mpiexec`` (MPICH's
    hydra forwards it to every rank) then stops the job the same way instead
    of raising ``KeyboardInterrupt`` on every rank (tracebacks and an
    ``MPI_Abort`` that loses the round in progress).  A signal that arrives while the
    stop is already pending (a second Ctrl-C, ``scancel`` after the warning
    signal) changes nothing: it is noted once on stderr and otherwise ignored,
    never a traceback.  (Hydra itself may end the job on a second Ctrl-C at
    ``mpiexec``; the last checkpoint written stays valid.)

    The previous handlers come back at the end of the run, unless
    ``restore=False``: a process that exits after the run (the CLI) keeps
    catching them, so a signal that arrives while it shuts down (SLURM's
    ``scancel`` signals every process, the batch script forwards another)
    cannot kill it with the default action.  Outside the main thread (where
    Python cannot install handlers) it does nothing."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS, restore: bool = True) -> None:
        self.received: list[int] = []
        self.restore = restore
        self._previous: dict[int, Any] = {}
        self._repeat_noted = False
        if threading.current_thread() is not threading.main_thread():
            log.warning("SignalStop created outside the main thread: signals will not stop the run")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        """Record the signal (the run stops at its next round boundary) and say so once.

        The note goes straight to file descriptor 2 with one ``os.write``, not
        through ``logging``: a handler may run in the middle of another write
        to ``sys.stderr``, where a buffered write would fail as reentrant.  It
        is written where INFO records of this logger are enabled (rank 0 of the
        CLI)."""
        self.received.append(signum)
        if len(self.received) == 1:
            self._note(f"{signal.Signals(signum).name} received: stopping after the current round and writing a "
                       "checkpoint (continue with --resume)")
        elif not self._repeat_noted:
            self._repeat_noted = True
            self._note(f"{signal.Signals(signum).name} received while already stopping: ignored")

    @staticmethod
    def _note(text: str) -> None:
        if log.isEnabledFor(logging.INFO):
            try:
                os.write(2, f"qmlhfl-mpi: stopping: {text}\n".encode())
            except OSError:  # stderr closed: nothing to tell
                pass

    @property
    def reason(self) -> str:
        """The names of the signals received so far, e.g. ``"SIGINT"``, in order, without repeats."""
        return ", ".join(dict.fromkeys(signal.Signals(s).name for s in self.received))

    def on_round_end(self, session: Session, record: Record) -> bool:
        return bool(self.received)

    def on_run_end(self, session: Session, summary: RunSummary) -> None:
        if not self.restore:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
