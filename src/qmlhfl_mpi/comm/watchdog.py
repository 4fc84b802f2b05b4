"""A deadline for every global round (``train.round_timeout``), enforced while ranks wait.

A rank that stops (SIGSTOP, a hung file system, a dead node the MPI runtime
does not notice) leaves the others waiting in a collective for ever.  With a
:class:`Watchdog`, every wait of a round (:func:`.collectives.wait` and the
reductions that take a ``guard``) is a ``Test`` loop that also calls
:meth:`Watchdog.poll`:

* every rank answers a *ping* from rank 0 with a *pong* whenever it waits;
* when the round's deadline passes, rank 0 pings all other ranks, collects
  pongs for a grace period, and sends every rank that answered an *abort*
  naming the ranks that did not (:class:`RoundTimeout` on each of them);
* a rank that receives no abort within two grace periods after the deadline
  concludes that rank 0 itself does not respond.

Messages travel on a duplicate of the run's communicator, so they never mix
with the round's own.  A rank busy computing answers at its next wait, so the
grace period is at least 2 s.  The first round of a process gets
:data:`WARMUP_S` extra seconds (numba's kernels load, torch warms up).  Collective: construction (``Dup``).
"""
from __future__ import annotations

import time

from mpi4py import MPI

PING, PONG, ABORT = 9101, 9102, 9103
WARMUP_S = 60.0  # extra time for the first round a process runs

__all__ = ["RoundTimeout", "Watchdog"]


class RoundTimeout(Exception):
    """The round did not finish within the deadline; ``message`` names the ranks that did not respond."""

    def __init__(self, message: str, silent: tuple[int, ...]) -> None:
        super().__init__(message)
        self.message, self.silent = message, silent


class Watchdog:
    """The deadline of the current round on one rank (see the module doc)."""

    def __init__(self, comm: MPI.Intracomm, timeout: float) -> None:
        self.hb = comm.Dup()
        self.rank, self.size = self.hb.Get_rank(), self.hb.Get_size()
        self.timeout = float(timeout)
        self.grace = min(10.0, max(2.0, self.timeout / 4))
        self.round = -1
        self.deadline: float | None = None
        self._sent: list[MPI.Request] = []

    def start(self, round_: int, first: bool = False) -> None:
        """Arm the deadline for ``round_``; the ``first`` round of a process gets :data:`WARMUP_S` more
        (compiled kernels load, caches fill)."""
        self.round, self.deadline = round_, time.monotonic() + self.timeout + (WARMUP_S if first else 0.0)

    def stop(self) -> None:
        self.deadline = None

    def _answer_pings(self) -> None:
        status = MPI.Status()
        while self.hb.Iprobe(source=0, tag=PING, status=status):
            self.hb.recv(source=0, tag=PING)
            self._sent.append(self.hb.isend(self.round, dest=0, tag=PONG))

    def poll(self) -> None:
        """Called while waiting: answer pings; raise :class:`RoundTimeout` when the round is over time."""
        if self.rank != 0:
            self._answer_pings()
            if self.hb.Iprobe(source=0, tag=ABORT):
                message, silent = self.hb.recv(source=0, tag=ABORT)
                raise RoundTimeout(message, tuple(silent))
        if self.deadline is None:
            return
        late = time.monotonic() - self.deadline
        if late <= 0:
            return
        if self.rank == 0:
            self._detect()
        elif late > 2 * self.grace + 1:
            raise RoundTimeout(self._message((0,), "rank 0, which decides, did not answer either"), (0,))

    def _message(self, silent: tuple[int, ...], extra: str = "") -> str:
        who = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not respond within "
               f"{self.grace:g} s (stopped, hung, or on a dead node)") if silent else \
            "every rank responds, but the round is still not done (one is much slower than the others?)"
        return (f"global round {self.round} did not finish within train.round_timeout = {self.timeout:g} s: {who}"
                f"{'; ' + extra if extra else ''}. The job stops; continue it with --resume (on other nodes if one "
                "failed), or raise train.round_timeout if rounds are legitimately this slow.")

    def _detect(self) -> None:
        for r in range(1, self.size):
            self._sent.append(self.hb.isend(self.round, dest=r, tag=PING))
        answered: set[int] = set()
        status = MPI.Status()
        end = time.monotonic() + self.grace
        while len(answered) < self.size - 1 and time.monotonic() < end:
            while self.hb.Iprobe(source=MPI.ANY_SOURCE, tag=PONG, status=status):
                src = status.Get_source()
                self.hb.recv(source=src, tag=PONG)
                answered.add(src)
            time.sleep(0.01)
        silent = tuple(r for r in range(1, self.size) if r not in answered)
        message = self._message(silent)
        for r in sorted(answered):
            self._sent.append(self.hb.isend((message, silent), dest=r, tag=ABORT))
        raise RoundTimeout(message, silent)

    def free(self) -> None:
        self.hb.Free()
