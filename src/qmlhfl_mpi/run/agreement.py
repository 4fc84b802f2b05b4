"""Errors and stop votes that every rank of a run agrees on.  Collective over the run's communicator.

A problem one rank can see (bad data, a failed write, a callback that
raised) must stop every rank together, with one message and a documented
exit code, instead of leaving the others waiting in a collective.  Every
step that may fail runs through :meth:`Agreement.step`: expected errors keep
their code and message; anything else is an unexpected error (exit 1) whose
traceback goes to the failing rank's log.
"""
from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ..comm.collectives import agree
from ..comm.watchdog import Watchdog
from ..core.exitcodes import EXIT_ABORT, EXIT_IO, EXIT_USAGE
from .callbacks import Callback
from .errors import RunError

log = logging.getLogger(__name__)

__all__ = ["Agreement", "code_of"]


def code_of(e: BaseException) -> int:
    """The exit code of an error: a :class:`RunError`'s own, 74 for an ``OSError``, else 1."""
    if isinstance(e, RunError):
        return e.code
    return EXIT_IO if isinstance(e, OSError) else EXIT_ABORT


class Agreement:
    """Agreement over ``comm`` (any object with ``Get_rank``, as ``agree`` needs).  ``guard`` (the run's
    watchdog, once it exists) is polled while ranks wait."""

    def __init__(self, comm: Any) -> None:
        self.comm, self.rank = comm, comm.Get_rank()
        self.guard: Watchdog | None = None

    def step(self, fn: Callable[[], Any], expected: tuple[type[BaseException], ...], code: int = EXIT_USAGE,
             stage: str = "starting the run") -> Any:
        """Run ``fn`` on every rank; if it raises anywhere, every rank raises the same :class:`RunError`.
        One of ``expected`` gives ``code`` (its own for a ``RunError`` or ``OSError``) and its message; any
        other exception is unexpected: exit 1, its type and message, and the traceback in the failing rank's
        log.  ``fn`` must not be collective past the point where it may raise.  Collective."""
        result, msg = None, None
        try:
            result = fn()
        except expected as e:
            msg = f"{code_of(e) if isinstance(e, (RunError, OSError)) else code}|{e}"
        except Exception as e:  # noqa: BLE001 - unexpected: every rank still stops together, cleanly
            log.error("unexpected error on rank %d while %s:\n%s", self.rank, stage, traceback.format_exc())
            msg = (f"{EXIT_ABORT}|unexpected error on rank {self.rank} while {stage}: {type(e).__name__}: {e} "
                   "(the traceback is in that rank's log; please report it)")
        self.raise_agreed(msg)
        return result

    def on_rank0(self, stage: str, write: Callable[..., None], *args: Any) -> None:
        """``write(*args)`` on rank 0 (results and checkpoints); a failed write is exit 74 everywhere.
        ``stage`` says what is being done, for an unexpected error's message.  Collective."""
        self.step(lambda: write(*args) if self.rank == 0 else None, (OSError,), EXIT_IO, stage=stage)

    def raise_agreed(self, msg: str | None, stop: bool = False) -> bool:
        """Raise the lowest rank's ``"code|message"`` on every rank if any rank has one; else whether any
        rank votes to ``stop``.  Collective."""
        agreed, any_stop = agree(self.comm, msg, stop, self.guard)
        if agreed is not None:
            code, _, text = agreed.partition("|")
            raise RunError(text, int(code))
        return any_stop

    def hooks(self, callbacks: Sequence[Callback], name: str, session: Any, *args: Any) -> bool:
        """Call hook ``name`` of every callback on this rank; agree on errors and stop votes.  Collective."""
        msg, stop = None, False
        for cb in callbacks:
            try:
                stop = bool(getattr(cb, name)(session, *args)) or stop
            except Exception as e:  # noqa: BLE001 - a callback's failure must reach every rank
                if not isinstance(e, (RunError, OSError)):
                    log.error("callback %s.%s failed on rank %d:\n%s", type(cb).__name__, name, self.rank,
                              traceback.format_exc())
                text = str(e) if isinstance(e, (RunError, OSError)) else \
                    f"callback {type(cb).__name__}.{name} failed on rank {self.rank}: {type(e).__name__}: {e}"
                msg = msg or f"{code_of(e)}|{text}"
        return self.raise_agreed(msg, stop)
