"""Stopping cleanly on SIGTERM / SIGUSR1 (the batch system's warning signals): a callback that asks to stop."""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .callbacks import Callback, Record

if TYPE_CHECKING:  # pragma: no cover
    from .session import RunSummary, Session

log = logging.getLogger(__name__)


class SignalStop(Callback):
    """Installs handlers for ``signals`` when created (so a signal during start-up
    counts too) and asks the run to stop at the next round boundary once one
    arrived.  The previous handlers come back at the end of the run, unless
    ``restore=False``: a process that exits after the run (the CLI) keeps
    catching them, so a signal that arrives while it shuts down (SLURM's
    ``scancel`` signals every process, the batch script forwards another)
    cannot kill it with the default action.  Outside the main thread (where
    Python cannot install handlers) it does nothing."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1), restore: bool = True) -> None:
        self.received: list[int] = []
        self.restore = restore
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("SignalStop created outside the main thread: signals will not stop the run")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    @property
    def reason(self) -> str:
        return ", ".join(signal.Signals(s).name for s in self.received)

    def on_round_end(self, session: Session, record: Record) -> bool:
        return bool(self.received)

    def on_run_end(self, session: Session, summary: RunSummary) -> None:
        if not self.restore:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
