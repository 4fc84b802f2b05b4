"""The rounds of a run with buffered layers (core/tiers.py, docs/algorithms.md "Buffered layers"): the
schedule's events carried out one after another by the executor, the same on every rank.

A round is the events up to the cloud's ``ceil(C / k_N)``-th update.  A job starts (the executor runs its
one-child plan from its node's model and holds the message on the node's leader), a message arrives (into the
node's buffer), a node updates (on its leader, the model broadcast), a node below the cloud sends its job's
delta up (to its parent's leader), or adopts its parent's model.  Bytes: the model down to a child counts when
its job starts or when it adopts, a message when it arrives.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..comm.executor import RoundExecutor
from ..core import rng
from ..core.scheduler import FINISH_PERCENTILES, RoundScheduler, TimedRound
from ..core.stats import RoundStats
from ..core.tiers import ADOPT, ARRIVE, FLUSH, SEND, START, Pending, TieredSchedule, TierEvent
from ..core.topology import aggregations_per_round
from .agreement import Agreement

__all__ = ["BufferedRounds"]


class BufferedRounds:
    """The rounds of a buffered run from round ``start`` on (the rounds before are timed again, nothing is
    trained); the executor's buffered state (models below the cloud, messages in flight and buffered) is a
    fresh start's or a checkpoint's.  Collective: every rank makes it and calls :meth:`round` together."""

    def __init__(self, scheduler: RoundScheduler, executor: RoundExecutor, agreement: Agreement, start: int,
                 w: np.ndarray) -> None:
        self.scheduler, self.executor = scheduler, executor
        self.schedule: TieredSchedule = scheduler.schedule()
        self._rounds: Iterator[list[TierEvent]] = self.schedule.rounds()
        below = [(x.layer, x.node) for x in self.schedule.tiers if x.parent is not None]
        if start == 0:
            for key in below:
                executor.tier_models[key] = (w.copy(), w.copy())
            return
        executor.share_tiers(below)
        pending = self.schedule.pending(next(self._rounds) for _ in range(start))
        agreement.step(lambda: self._check(pending, start), (RuntimeError,), stage="resuming a buffered run")

    def _check(self, pending: Pending, start: int) -> None:
        """The messages this rank holds are those the schedule has in flight and buffered after round
        ``start - 1`` (the checkpoint and the schedule agree)."""
        ex, tiers = self.executor, self.schedule.tiers
        flying = set()
        for i, pos in pending.flying:
            if ex.leads(tiers[i].layer, tiers[i].node):
                flying.add((tiers[i].layer, tiers[i].children[pos]))
        if flying != set(ex.held.held):
            raise RuntimeError(f"the checkpoint holds the messages in flight {sorted(ex.held.held)} (layer, child) "
                               f"but the schedule has {sorted(flying)} in flight after round {start - 1}")
        for i, t in enumerate(tiers):
            if not ex.leads(t.layer, t.node):
                continue
            want = [t.children[pos] for pos in pending.buffers.get(i, [])]
            got = [c for c, _ in ex.held.buffers.get((t.layer, t.node), [])]
            if got != want:
                raise RuntimeError(f"the checkpoint's buffer of layer {t.layer} node {t.node} holds children {got} "
                                   f"but the schedule has {want} after round {start - 1}")

    def _model(self, i: int, w: np.ndarray) -> np.ndarray:
        t = self.schedule.tiers[i]
        return w if t.parent is None else self.executor.tier_models[(t.layer, t.node)][0]

    def round(self, w: np.ndarray) -> tuple[np.ndarray, dict[str, Any], np.ndarray, np.ndarray, float]:
        """The next round from cloud model ``w``: the new model, the clock's metrics, what was sent but dropped
        inside jobs (per link: messages, downlinks), and the round's end in virtual time.  Collective."""
        ex, tiers, N = self.executor, self.schedule.tiers, self.executor.tree.N
        events = next(self._rounds)
        jobs: list[TimedRound] = [e.payload for e in events if e.kind == START]
        parts = [timed.plan.devices() for timed in jobs]
        stats = RoundStats(np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64), N)
        ex.stats = stats
        extra_m, extra_d = np.zeros(N, dtype=np.int64), np.zeros(N, dtype=np.int64)
        dropped, busy, offline = np.zeros(N, dtype=np.int64), np.zeros(N), 0
        for e in events:
            t = tiers[e.tier]
            n, u = t.layer, t.node
            if e.kind == START:
                timed = e.payload
                ex.run(timed.plan, self._model(e.tier, w), stats=stats, hold=True, root=(n, u))
                if ex.leads(n, u):  # the node's model goes to the child now; its message counts when it arrives
                    stats.downlink_bytes[n - 1] += ex.down_len[n - 1]
                    stats.messages[n - 1] -= 1
                    stats.uplink_bytes[n - 1] -= ex.msg_len[n - 1]
                extra_m += timed.extra_messages
                extra_d += timed.extra_downlinks
                dropped += timed.clock.dropped
                busy += timed.clock.link_busy
                offline += timed.clock.offline
            elif e.kind == ARRIVE:
                ex.arrive(n, u, t.children[e.child])
            elif e.kind == FLUSH:
                new = ex.flush(n, u, e.entries, self._model(e.tier, w))
                if t.parent is None:
                    w = new
                else:
                    ex.tier_models[(n, u)] = (new, ex.tier_models[(n, u)][1])
            elif e.kind == SEND:  # keyed as the synchronous run's message of that work: (round, call)
                per_round = aggregations_per_round(self.scheduler.planner.tau, n + 1)  # its sends a round
                ex.send(n, u, (self.scheduler.planner.seed, rng.QUANT, n + 1, u, e.job // per_round,
                               e.job % per_round))
                busy[n] += t.busy
            elif e.kind == ADOPT:
                assert t.parent is not None
                ex.adopt(n, u, self._model(t.parent, w))
        ex.hold = False
        end = float(events[-1].time)
        clock = {"virtual_time": end, "dropped": dropped, "offline": offline, "link_busy": busy,
                 "critical_path": np.full(N + 1, -1, dtype=np.int64),
                 "finish_time": np.full(len(FINISH_PERCENTILES), np.nan)}
        return w, clock, extra_m, extra_d, end
