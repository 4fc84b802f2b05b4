"""The round's control channel: failure notices, and a deadline for every global round
(``train.round_timeout``), both enforced while ranks wait.

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

A rank that fails unexpectedly inside a round (where the others wait for its
messages) first sends rank 0 a *failure notice* (:meth:`Watchdog.notify_failure`);
rank 0 receives it at its next wait (:class:`PeerFailed`), records the failure in
the results file, releases the output's lock and ends the job.  Without a
deadline (``timeout`` 0) the watchdog only carries these notices.

Messages travel on a duplicate of the run's communicator, so they never mix
with the round's own.  A rank busy computing answers at its next wait, so the
grace period is at least 2 s.  The first round of a process gets
:data:`WARMUP_S` extra seconds (numba's kernels load, torch warms up).  Collective: construction (``Dup``).
"""
from __future__ import annotations

import time

from mpi4py import MPI

PING, PONG, ABORT, FAILED = 9101, 9102, 9103, 9104
WARMUP_S = 60.0  # extra time for the first round a process runs
NOTICE_WAIT_S = 30.0  # how long a failed rank waits for rank 0 to end the job before it aborts it itself

__all__ = ["NOTICE_WAIT_S", "PeerFailed", "RoundTimeout", "Watchdog"]


class PeerFailed(Exception):
    """Raised on rank 0: another rank failed inside the round (its message says where and why)."""


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
        self.timeout = float(timeout)  # 0: no deadline, failure notices only
        self.grace = min(10.0, max(2.0, self.timeout / 4))
        self.round = -1
        self.deadline: float | None = None
        self._sent: list[MPI.Request] = []

    def start(self, round_: int, first: bool = False) -> None:
        """Arm the deadline for ``round_``; the ``first`` round of a process gets :data:`WARMUP_S` more
        (compiled kernels load, caches fill)."""
        self.round = round_
        self.deadline = time.monotonic() + self.timeout + (WARMUP_S if first else 0.0) if self.timeout > 0 else None

    def stop(self) -> None:
        self.deadline = None

    def _answer_pings(self) -> None:
        status = MPI.Status()
        while self.hb.Iprobe(source=0, tag=PING, status=status):
            self.hb.recv(source=0, tag=PING)
            self._sent.append(self.hb.isend(self.round, dest=0, tag=PONG))

    def notify_failure(self, message: str) -> None:
        """On a rank other than 0 that failed inside a round: tell rank 0 (:class:`PeerFailed` at its next
        wait), then give it :data:`NOTICE_WAIT_S` to end the job.  Returns only if it did not; the caller
        then aborts the job itself.  Not collective."""
        if self.rank == 0 or self.size == 1:
            return
        req = self.hb.isend(message, dest=0, tag=FAILED)
        end = time.monotonic() + NOTICE_WAIT_S
        while time.monotonic() < end:  # rank 0's MPI_Abort ends this process meanwhile
            req.Test()
            time.sleep(0.05)

    def poll(self) -> None:
        """Called while waiting: answer pings; raise :class:`PeerFailed` when another rank sent a failure
        notice (rank 0), :class:`RoundTimeout` when the round is over time."""
        if self.rank == 0 and self.size > 1:
            status = MPI.Status()
            if self.hb.Iprobe(source=MPI.ANY_SOURCE, tag=FAILED, status=status):
                raise PeerFailed(str(self.hb.recv(source=status.Get_source(), tag=FAILED)))
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
        """Free the control channel's communicator (idempotent)."""
        if self.hb != MPI.COMM_NULL:
            self.hb.Free()
