"""One writer per output: an exclusive lock file ``<output>.lock`` held while a run writes.

The lock is created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file
systems) and holds the holder's host, pid, start time and SLURM job id as
JSON.  A second run on the same output stops at once with a message naming
the holder.  A lock whose process is gone (same host, no such pid; or the same
SLURM job, requeued) is *stale*: it is taken over, with a warning naming the
dead holder, only by ``--resume`` or ``--overwrite`` (the two ways of taking
over an interrupted run's output); otherwise the refusal explains it and how to
proceed.  A lock held from another host cannot be checked and is never taken
over.  Used on one rank (rank 0).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.exitcodes import EXIT_USAGE
from .errors import RunError

log = logging.getLogger(__name__)

__all__ = ["OutputLock", "lock_path"]


def lock_path(output: str | Path) -> Path:
    return Path(f"{output}.lock")


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    job: str

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"pid {self.pid} on host {self.host!r}{job}, started {self.started}"


def _me() -> Holder:
    return Holder(socket.gethostname(), os.getpid(),
                  _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  os.environ.get("SLURM_JOB_ID", ""))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The lock of one output file (see the module doc)."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self.held = False

    def _read(self) -> Holder | None:
        for _ in range(10):  # a lock being created may be empty for a moment
            try:
                raw: Any = json.loads(self.path.read_text())
                return Holder(str(raw["host"]), int(raw["pid"]), str(raw.get("started", "?")),
                              str(raw.get("job", "")))
            except FileNotFoundError:
                return None
            except (ValueError, KeyError, TypeError, OSError):
                time.sleep(0.05)
        return Holder("?", -1, "?", "")

    def _create(self, me: Holder) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me.__dict__, f)
        self.held = True
        return True

    def acquire(self, take_over_stale: bool) -> None:
        """Take the lock or raise :class:`RunError` (exit 2) naming the holder."""
        me = _me()
        if self._create(me):
            return
        holder = self._read()
        if holder is None:  # released in between
            if self._create(me):
                return
            holder = self._read() or Holder("?", -1, "?", "")
        where = f"{str(self.output)!r} is locked by {str(self.path)!r}"
        if holder.pid < 0:
            raise RunError(f"{where}, which is unreadable. If no run is writing this output, delete the lock file",
                           EXIT_USAGE)
        same_job = bool(holder.job) and holder.job == me.job
        if holder.host == me.host and holder.pid == me.pid:
            raise RunError(f"{where}, held by this very process: a run on this output is still open", EXIT_USAGE)
        if holder.host == me.host and _alive(holder.pid) and not same_job:
            raise RunError(f"{where}: another run is writing it ({holder.describe()}). Wait for it to end, or "
                           "choose another output.path", EXIT_USAGE)
        if holder.host != me.host and not same_job:
            raise RunError(f"{where}: a run on another machine holds it ({holder.describe()}), which cannot be "
                           "checked from here. If that run is gone (a failed node), delete the lock file; "
                           "otherwise choose another output.path", EXIT_USAGE)
        # stale: the holder's process is gone (or it was this SLURM job before a requeue)
        if not take_over_stale:
            raise RunError(f"{where}, left by a run that is no longer running ({holder.describe()}; it was "
                           "killed or crashed). Continue it with --resume, start over with --overwrite, or "
                           "delete the lock file", EXIT_USAGE)
        log.warning("taking over the stale lock %s of a run that is no longer running (%s)", self.path,
                    holder.describe())
        self.path.unlink(missing_ok=True)
        if not self._create(me):
            raise RunError(f"{where}: another run took it while this one was taking over a stale lock", EXIT_USAGE)

    def release(self) -> None:
        """Delete the lock if this process holds it (idempotent)."""
        if not self.held:
            return
        holder = self._read()
        if holder is not None and holder.pid == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
