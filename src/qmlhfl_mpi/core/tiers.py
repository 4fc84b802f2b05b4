"""Buffered (semi-asynchronous) layers at any depth, as a schedule of events (pure); docs/algorithms.md,
"Buffered layers".

The buffered layers are a top segment (layers ``m..N``; the layers below are synchronous).  Every buffered node
buffers what its children send and updates every ``k_n`` arrivals, each weighted by its share of the buffer's
sizes times ``s(versions behind)`` (:func:`.asynchrony.buffer_weights`).  Its children are

* *leaf jobs* (a layer-``m`` node's children: devices, or synchronous subtrees), each lasting what the clock
  gives its one-child plan (``job(node, child, j, t0) -> (seconds, payload)``); or
* buffered nodes, which work in jobs for their parent: a job adopts the parent's newest model (a version of
  its own), does ``updates`` updates, then sends its delta up (arriving ``up`` seconds later).

**The pause rule.**  A node that has sent its delta is *paused* until it adopts its parent's newest model,
``down`` seconds after its message arrived (and not before the parent is itself unpaused): while paused it
buffers arrivals without applying them, and its children that finish do not restart.  On adopting it applies
its full buffers, then restarts its waiting children in id order.  So a node's children never start from a
model its parent has not seen, and with every ``k_n`` = the node's children, constant staleness, equal (positive)
job times and equal links per layer, the run is the synchronous one.

**Ties.**  Events are ordered by ``(time, phase, layer, node, child)``: at one instant every arrival is
handled (bottom-up), then every adoption, then every job start; a cascade at one instant (an arrival fills a
buffer, the update ends the node's job, its message arrives at once) keeps this order.

A *round* is ``ceil(C / k_N)`` cloud updates (``C`` the cloud's children).  It ends with its last update; the
events at that instant after it belong to the next round.  Every time comes from the virtual clock, so the
schedule is computed before anything is trained and is the same on every rank; what is in flight and buffered
after some rounds (:meth:`TieredSchedule.pending`) is, with the tiers' models, the whole asynchronous state
of a checkpoint.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .asynchrony import Staleness, buffer_weights, by_round

__all__ = ["ADOPT", "ARRIVE", "FLUSH", "SEND", "START", "Pending", "Tier", "TierEvent", "TieredSchedule"]

ARRIVE, ADOPT, START = 0, 1, 2   # phases at one instant
FLUSH, SEND = 3, 4               # emitted while an arrival or an adoption is handled


@dataclass
class Tier:
    """One buffered node: its ``children`` (positions 0..C-1 are ``children[i]``, ids of layer ``layer - 1``),
    their ``sizes``, the buffer ``k`` and ``staleness``; ``parent``: the index of its parent among the
    schedule's tiers (``None``: the cloud), ``updates`` a job of it holds, and the seconds ``up`` and ``down``
    of its message to its parent and of the parent's model to it; ``leaf``: its children are leaf jobs."""

    layer: int
    node: int
    children: Sequence[int]
    sizes: np.ndarray
    k: int
    staleness: Staleness
    leaf: bool
    parent: int | None = None
    slot: int = -1                 # its position among the parent's children
    updates: int = 1
    up: float = 0.0
    down: float = 0.0
    busy: float = 0.0              # of ``up``, the seconds its message occupies the link (bits over rate)
    # the run's state (the schedule's own bookkeeping)
    version: int = field(default=0, init=False)
    paused: bool = field(default=False, init=False)
    done: int = field(default=0, init=False)              # updates in the current job
    job: int = field(default=0, init=False)               # jobs sent up so far
    since: int = field(default=0, init=False)             # the parent's version its current job started from
    buffer: list[tuple[int, int]] = field(default_factory=list, init=False)   # (position, version it started at)
    waiting: list[int] = field(default_factory=list, init=False)              # children that wait to restart
    jobs: list[int] = field(default_factory=list, init=False)                 # leaf children: their next job
    started: list[int] = field(default_factory=list, init=False)              # leaf children: version at start


@dataclass(frozen=True)
class TierEvent:
    """``START`` (a leaf job of ``child`` at tier ``tier``: job ``job``, from version ``version``), ``ARRIVE``
    (``child``'s message reaches tier ``tier``), ``FLUSH`` (tier ``tier`` applies ``entries`` and reaches
    ``version``), ``SEND`` (tier ``tier`` sends its job ``job`` up) or ``ADOPT`` (tier ``tier`` takes its
    parent's version ``version``)."""

    kind: int
    time: float
    tier: int
    child: int = -1
    job: int = -1
    version: int = 0
    round: int = 0
    entries: tuple[tuple[int, np.float32], ...] = ()
    round_end: bool = False
    payload: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Pending:
    """``flying``: ``(tier, position)`` of every message sent and not yet arrived; ``buffers``: by tier, the
    positions of the messages arrived and not yet applied, in arrival order."""

    flying: set[tuple[int, int]]
    buffers: dict[int, list[int]]


class TieredSchedule:
    """The events of the buffered tiers ``tiers`` (the cloud among them, parents before children);
    ``job(tier, position, j, t0) -> (seconds, payload)`` times a leaf job."""

    def __init__(self, tiers: Sequence[Tier], job: Callable[[int, int, int, float], tuple[float, Any]]) -> None:
        self.tiers, self.job = list(tiers), job
        roots = [i for i, t in enumerate(self.tiers) if t.parent is None]
        if len(roots) != 1:
            raise ValueError(f"expected one cloud among the tiers, got {len(roots)}")
        self.cloud = roots[0]
        for t in self.tiers:
            if not 1 <= t.k <= len(t.children):
                raise ValueError(f"buffer k = {t.k} at layer {t.layer} node {t.node}: expected 1 <= k <= "
                                 f"{len(t.children)} (its children)")
        self.per_round = math.ceil(len(self.tiers[self.cloud].children) / self.tiers[self.cloud].k)
        self._sub = {(t.parent, t.slot): j for j, t in enumerate(self.tiers) if t.parent is not None}

    def events(self) -> Iterator[TierEvent]:
        """Every event, in order, forever."""
        tiers, seq = self.tiers, [0]
        heap: list[tuple[float, int, int, int, int, int, int]] = []
        rnd = [0]

        def push(time: float, phase: int, i: int, child: int) -> None:
            t = tiers[i]
            heapq.heappush(heap, (time, phase, t.layer, t.node, child, seq[0], i))
            seq[0] += 1

        def flush(i: int, now: float) -> Iterator[TierEvent]:
            """Tier ``i`` applies its first ``k`` buffered messages (while it may); a job that ends is sent."""
            t = tiers[i]
            while not t.paused and len(t.buffer) >= t.k:
                taken, t.buffer = t.buffer[: t.k], t.buffer[t.k :]
                entries = buffer_weights(t.sizes, taken, t.version, t.staleness)
                t.version += 1
                end = t.parent is None and t.version % self.per_round == 0
                yield TierEvent(FLUSH, now, i, version=t.version, round=rnd[0], entries=entries, round_end=end)
                if end:
                    rnd[0] += 1
                if t.parent is not None:
                    t.done += 1
                    if t.done == t.updates:
                        t.done, t.paused = 0, True
                        yield TierEvent(SEND, now, i, job=t.job, version=t.version, round=rnd[0])
                        t.job += 1
                        push(now + t.up, ARRIVE, t.parent, t.slot)

        def restart(i: int, pos: int, now: float) -> None:
            """Child ``pos`` of tier ``i`` starts again: a leaf job now, a tier after its downlink."""
            t = tiers[i]
            if t.leaf:
                push(now, START, i, pos)
            else:
                sub = self._child_tier(i, pos)
                push(now + tiers[sub].down, ADOPT, sub, -1)

        for i, t in enumerate(tiers):  # at 0 every tier holds the initial model; the leaves start
            if t.leaf:
                t.jobs, t.started = [0] * len(t.children), [0] * len(t.children)
                for pos in range(len(t.children)):
                    push(0.0, START, i, pos)
        while heap:
            now, phase, _, _, child, _, i = heapq.heappop(heap)
            t = tiers[i]
            if phase == ARRIVE:
                v = t.started[child] if t.leaf else tiers[self._child_tier(i, child)].since
                t.buffer.append((child, v))
                yield TierEvent(ARRIVE, now, i, child=child, version=v, round=rnd[0])
                yield from flush(i, now)
                if t.leaf:
                    t.jobs[child] += 1
                restart(i, child, now)
            elif phase == ADOPT:
                p = tiers[t.parent] if t.parent is not None else None
                if p is not None and p.paused:
                    p.waiting.append(t.slot)
                    continue
                t.version += 1
                t.since, t.paused = (p.version if p is not None else 0), False
                yield TierEvent(ADOPT, now, i, version=t.since, round=rnd[0])
                yield from flush(i, now)
                if not t.paused:
                    waiting, t.waiting = sorted(t.waiting), []
                    for pos in waiting:
                        restart(i, pos, now)
            else:  # START of a leaf job
                if t.paused:
                    t.waiting.append(child)
                    continue
                seconds, payload = self.job(i, child, t.jobs[child], now)
                t.started[child] = t.version
                yield TierEvent(START, now, i, child=child, job=t.jobs[child], version=t.version, round=rnd[0],
                                payload=payload)
                push(now + seconds, ARRIVE, i, child)

    def _child_tier(self, i: int, pos: int) -> int:
        try:
            return self._sub[(i, pos)]
        except KeyError:
            raise ValueError(f"tier {i} has no buffered child at position {pos}") from None

    def pending(self, done: Iterable[list[TierEvent]]) -> Pending:
        """What is in flight and buffered after the rounds ``done`` (lists of :meth:`rounds`)."""
        out = Pending(set(), {})
        for events in done:
            for e in events:
                if e.kind == START:
                    out.flying.add((e.tier, e.child))
                elif e.kind == SEND:
                    t = self.tiers[e.tier]
                    assert t.parent is not None
                    out.flying.add((t.parent, t.slot))
                elif e.kind == ARRIVE:
                    out.flying.discard((e.tier, e.child))
                    out.buffers.setdefault(e.tier, []).append(e.child)
                elif e.kind == FLUSH:
                    out.buffers[e.tier] = out.buffers[e.tier][len(e.entries):]
        return out

    def rounds(self) -> Iterator[list[TierEvent]]:
        """The events round by round: each list ends with the round's last cloud update."""
        return by_round(self.events())
