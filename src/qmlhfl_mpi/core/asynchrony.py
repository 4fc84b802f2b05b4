"""The buffered (semi-asynchronous) cloud, as a schedule of events (pure).

With ``aggregation.policy: buffered`` on the cloud (layer ``N``), the cloud's children never wait for each other.
Each child ``c`` works in *jobs*: job ``j`` starts from the cloud's newest model (its *version*: the number of
cloud updates so far), runs what one synchronous round gives a child (a device: ``tau_1`` SGD steps; a node:
its ``tau_N`` synchronous aggregations of its subtree, planned as round ``j`` of that subtree), and sends
``Q(x - v_start)`` up.  The cloud buffers what arrives; when ``k`` messages are buffered it applies its server
optimiser to

    g = sum_{i in buffer} (D(c_i) / sum_{buffer} D) * s(V - v_i) * decode(m_i)      (float32, in buffer order)

with ``V`` its version and ``s`` the staleness function, and its version grows by one.  A child whose message
arrived starts its next job at once, from the newest model.  (FedBuff, Nguyen et al. 2022; the staleness
functions of FedAsync, Xie et al. 2019: ``constant``, ``polynomial(a)``: ``(1 + s)^-a``, ``hinge(a, b)``: 1 for
``s <= b``, else ``1 / (a (s - b) + 1)``.)

Every time comes from the virtual clock (a job lasts what the clock gives its plan), so the schedule is computed
before anything is trained and is the same on every rank.  Ties: at one instant every arrival is handled
(ordered by child id; a full buffer is applied at once) before any child starts again, so a child that arrives
with others starts from the model their update made.  With ``k`` = the number of children, constant
staleness and equal job times every job starts from the newest model and the run is the synchronous one.

A *round* of a buffered run is ``ceil(C / k)`` cloud updates (``C`` children): about as many messages as a
synchronous round.  It ends with its last update; the restarts at that instant belong to the next round.  So
at every round's end the buffer is empty, and what is in flight is one finished-but-not-arrived message per
busy child: that, and the schedule (recomputed), is the whole asynchronous state of a checkpoint.
"""
from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

__all__ = ["ARRIVE", "FLUSH", "START", "AsyncEvent", "BufferedSchedule", "Staleness", "buffer_weights", "by_round"]

START, ARRIVE, FLUSH = 0, 1, 2


class Staleness:
    """A staleness function ``s(versions behind)`` from its text: ``constant``, ``polynomial(a)`` (a >= 0) or
    ``hinge(a, b)`` (a >= 0, b >= 0)."""

    FORMS = ("constant", "polynomial(a)", "hinge(a, b)")

    def __init__(self, text: str) -> None:
        self.text = str(text).strip()
        m = re.fullmatch(r"(constant|polynomial|hinge)(?:\((.*)\))?", self.text.replace(" ", ""))
        bad = ValueError(f"staleness {text!r}: expected one of {', '.join(self.FORMS)} (numbers >= 0), e.g. "
                         "polynomial(0.5)")
        if m is None:
            raise bad
        self.kind = m.group(1)
        try:
            args = tuple(float(x) for x in m.group(2).split(",")) if m.group(2) else ()
        except ValueError:
            raise bad from None
        if len(args) != {"constant": 0, "polynomial": 1, "hinge": 2}[self.kind] or \
                not all(math.isfinite(a) and a >= 0 for a in args):
            raise bad
        self.args = args

    def __call__(self, behind: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + behind) ** -self.args[0])
        a, b = self.args
        return 1.0 if behind <= b else 1.0 / (a * (behind - b) + 1.0)


@dataclass(frozen=True)
class AsyncEvent:
    """One event of a buffered schedule.

    ``START``: ``child`` starts job ``job`` at ``time`` from cloud version ``version`` (``payload``: what the job
    function returned for it, e.g. its timed plan).  ``ARRIVE``: its message reaches the cloud.  ``FLUSH``: the
    cloud applies its buffer, ``entries`` ``(child, weight)`` in buffer order, and reaches version ``version``;
    ``round_end`` when that update ends round ``round``."""

    kind: int
    time: float
    child: int = -1
    job: int = -1
    version: int = 0
    round: int = 0
    entries: tuple[tuple[int, np.float32], ...] = ()
    round_end: bool = False
    payload: Any = field(default=None, compare=False, repr=False)


def buffer_weights(sizes: np.ndarray, buffer: Sequence[tuple[int, int]], version: int,
                   staleness: Staleness) -> tuple[tuple[int, np.float32], ...]:
    """``(child, weight)`` of an update from ``buffer`` (``(child, version its job started from)``, in order) at
    version ``version``: the child's share of the buffer's sizes times ``s(versions behind)``, in float32."""
    got = np.array([sizes[c] for c, _ in buffer])
    share = got / got.sum() if got.sum() > 0 else np.zeros(len(buffer))
    return tuple((c, np.float32(share[i] * staleness(version - v))) for i, (c, v) in enumerate(buffer))


class _RoundEvent(Protocol):
    @property
    def round_end(self) -> bool: ...


E = TypeVar("E", bound=_RoundEvent)


def by_round(events: Iterable[E]) -> Iterator[list[E]]:
    """``events`` grouped by round: each list ends with an event whose ``round_end`` is set."""
    out: list[E] = []
    for e in events:
        out.append(e)
        if e.round_end:
            yield out
            out = []


class BufferedSchedule:
    """The events of a buffered cloud with ``children`` children of sizes ``sizes``, buffer ``k`` and
    staleness ``staleness``; ``job(c, j, t0) -> (seconds, payload)`` times child ``c``'s job ``j`` started at
    virtual time ``t0``."""

    def __init__(self, sizes: np.ndarray, k: int, staleness: Staleness,
                 job: Callable[[int, int, float], tuple[float, Any]]) -> None:
        self.sizes = np.asarray(sizes, dtype=np.float64)
        C = self.sizes.size
        if not 1 <= k <= C:
            raise ValueError(f"buffer k = {k}: expected 1 <= k <= {C} (the cloud's children)")
        self.k, self.staleness, self.job = int(k), staleness, job
        self.updates_per_round = math.ceil(C / self.k)

    @property
    def children(self) -> int:
        return int(self.sizes.size)

    def events(self) -> Iterator[AsyncEvent]:
        """Every event, in order, forever (rounds 0, 1, 2, ...)."""
        version, rnd = 0, 0
        jobs = [0] * self.children
        since = [0] * self.children          # the version each child's current job started from
        heap: list[tuple[float, int]] = []
        buffer: list[tuple[int, int]] = []   # (child, version its job started from)

        def start(c: int, t: float) -> AsyncEvent:
            seconds, payload = self.job(c, jobs[c], t)
            heapq.heappush(heap, (t + seconds, c))
            since[c] = version
            return AsyncEvent(START, t, c, jobs[c], version, rnd, payload=payload)

        for c in range(self.children):
            yield start(c, 0.0)
        while heap:
            now = heap[0][0]
            group = []
            while heap and heap[0][0] == now:
                group.append(heapq.heappop(heap)[1])
            group.sort()
            for c in group:
                yield AsyncEvent(ARRIVE, now, c, jobs[c], since[c], rnd)
                buffer.append((c, since[c]))
                if len(buffer) == self.k:
                    entries = buffer_weights(self.sizes, buffer, version, self.staleness)
                    version += 1
                    end = version % self.updates_per_round == 0
                    yield AsyncEvent(FLUSH, now, version=version, round=rnd, entries=entries, round_end=end)
                    buffer = []
                    if end:
                        rnd += 1
            for c in group:
                jobs[c] += 1
                yield start(c, now)

    def rounds(self) -> Iterator[list[AsyncEvent]]:
        """The events round by round: each list ends with the round's last update."""
        return by_round(self.events())

    @staticmethod
    def in_flight(done: Iterable[list[AsyncEvent]]) -> dict[int, AsyncEvent]:
        """The jobs started but not arrived after the rounds ``done`` (by child: its START event)."""
        busy: dict[int, AsyncEvent] = {}
        for events in done:
            for e in events:
                if e.kind == START:
                    busy[e.child] = e
                elif e.kind == ARRIVE:
                    busy.pop(e.child, None)
        return busy
