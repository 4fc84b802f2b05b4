"""A round planned against the clock (pure): draw the round (:class:`~.plan.Planner`), time it on the system
model with the layers' policies (:func:`~.clock.round_clock`), and keep only what is aggregated
(:meth:`~.plan.Planner.prune`).  Every rank computes the same :class:`TimedRound` before anything is trained,
so the executor never trains a dropped or offline child and the model stays the same on any number of ranks.

Bytes (docs/system.md, "What counts as sent"): a dropped child's message, and everything inside a dropped
child's subtree, crossed the wire (the clock timed it, the link was busy), so it counts in ``uplink_bytes``,
``messages`` and ``downlink_bytes`` like any other; ``dropped`` counts the messages a parent discarded.  An
offline device sends nothing.

With ``mobility`` (:class:`~.mobility.Mobility`: devices that move, edge servers that fail) each round is planned
on its tree of the moment, which :meth:`RoundScheduler.parent_changes` lists for the results
(``/topology/parents``).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np

from .clock import RoundClock, SystemModel, round_clock
from .membership import Membership
from .mobility import Mobility
from .plan import Planner, RoundPlan
from .policy import Buffered, Deadline, Policy
from .tiers import Tier, TieredSchedule
from .topology import aggregations_per_round

__all__ = ["FINISH_PERCENTILES", "RoundScheduler", "TimedRound", "changed_rows"]

FINISH_PERCENTILES = (0.0, 10.0, 50.0, 90.0, 100.0)


@dataclass(frozen=True)
class TimedRound:
    """One round: the plan the executor runs, the plan drawn, its clock, and the traffic of what was sent but
    not aggregated (per link)."""

    plan: RoundPlan
    drawn: RoundPlan
    clock: RoundClock
    extra_messages: np.ndarray
    extra_downlinks: np.ndarray

    @property
    def duration(self) -> float:
        return self.clock.duration

    def critical_path(self) -> np.ndarray:
        """int64, length N+1: column ``n`` is the layer-``n`` node on the round's critical path (column 0 the
        device), -1 below where it ends (a deadline, or nobody to wait for)."""
        out = np.full(self.drawn.num_links + 1, -1, dtype=np.int64)
        for layer, node in self.clock.critical_path(self.drawn):
            out[layer] = node
        return out

    def record(self, t0: float) -> dict[str, object]:
        """The round's clock metrics (results schema, docs/results.md) for a round that started at ``t0``."""
        return {"virtual_time": t0 + self.duration, "dropped": self.clock.dropped.copy(),
                "offline": self.clock.offline, "link_busy": self.clock.link_busy.copy(),
                "critical_path": self.critical_path(),
                "finish_time": self.clock.finish_percentiles(FINISH_PERCENTILES)}


@dataclass
class RoundScheduler:
    """Plans rounds against the clock: ``up_bits[n-1]``, ``down_bits[n-1]`` are the bits of one message on
    link ``n`` up and down (0 down: the downlink takes no time unless the system gives it a rate)."""

    planner: Planner
    system: SystemModel
    policies: tuple[Policy, ...]
    up_bits: tuple[int, ...]
    down_bits: tuple[int, ...]
    mobility: Mobility | None = None

    @property
    def dynamic(self) -> bool:
        """Whether the tree of the moment can differ from the tree (devices move or edge servers fail)."""
        return self.mobility is not None and self.mobility.dynamic

    def members(self, t: int, t0: float) -> Membership | None:
        """Round ``t``'s tree of the moment (``None``: the tree's own, nothing moves or fails)."""
        return self.mobility.at(t, t0) if self.mobility is not None and self.mobility.dynamic else None

    @property
    def buffered(self) -> int | None:
        """The lowest buffered layer ``m`` (layers ``m..N`` are; :mod:`.tiers`), or ``None``: every layer waits."""
        m = None
        for n in range(len(self.policies), 0, -1):
            if not isinstance(self.policies[n - 1], Buffered):
                break
            m = n
        return m

    def tiers(self) -> list[Tier]:
        """The buffered layers' nodes as the schedule's tiers, parents before children: each with its children's
        sizes, its layer's buffer and staleness, ``tau_{n+1}`` updates a job and the times of one message up and
        of its parent's model down link ``n+1`` (alone on the link)."""
        m = self.buffered
        assert m is not None
        tree, N = self.planner.tree, self.planner.tree.N
        out: list[Tier] = []
        index: dict[tuple[int, int], int] = {}
        for n in range(N, m - 1, -1):
            policy = self.policies[n - 1]
            assert isinstance(policy, Buffered)
            for u in range(tree.num_nodes(n)):
                kids = tree.children(n, u)
                tier = Tier(n, u, range(kids.start, kids.stop), self.planner.child_sizes(n, u), policy.buffer,
                            policy.staleness, leaf=n == m)
                if n < N:
                    p = tree.parent(n, u)
                    link, one = self.system.links[n], np.array([u])
                    busy = float(self.up_bits[n] / (link.ingress_rate if link.shared else link.up_rate[u]))
                    tier.parent, tier.slot, tier.updates = index[(n + 1, p)], u - tree.children(n + 1, p).start, \
                        int(self.planner.tau[n])
                    tier.up, tier.busy = busy + float(link.up_latency[u]), busy
                    tier.down = float(link.down_seconds(one, self.down_bits[n])[0])
                index[(n, u)] = len(out)
                out.append(tier)
        return out

    def jobs_per_round(self) -> int:
        """How many jobs a child of a lowest buffered node does in one synchronous round: ``prod(tau_{m+1..N})``."""
        m = self.buffered
        assert m is not None
        return aggregations_per_round(self.planner.tau, m)

    def schedule(self) -> TieredSchedule:
        """The events of the buffered layers (:mod:`.tiers`); each START's payload is its job's
        :class:`TimedRound`: job ``j`` of a child is the one-child plan of its node keyed as round
        ``j // P``, offset ``j % P`` (``P`` = :meth:`jobs_per_round`)."""
        tiers = self.tiers()
        P = self.jobs_per_round()

        def job(i: int, pos: int, j: int, t0: float) -> tuple[float, TimedRound]:
            return _timed(self.round(j // P, t0, only=pos, root=(tiers[i].layer, tiers[i].node), offset=j % P))

        return TieredSchedule(tiers, job)

    def buffered_ends(self) -> Iterator[float]:
        """A buffered run's rounds 0, 1, 2, ...: the virtual time each ends at (its last cloud update)."""
        for events in self.schedule().rounds():
            yield float(events[-1].time)

    def round(self, t: int, t0: float = 0.0, only: int | None = None, root: tuple[int, int] | None = None,
              offset: int = 0) -> TimedRound:
        """Round ``t``, starting at virtual time ``t0`` (seconds since the run started); ``only``, ``root``,
        ``offset``: one job of a buffered node (:meth:`.Planner.plan`)."""
        drawn = self.planner.plan(t, self.members(t, t0), only, root, offset)
        clock = round_clock(drawn, int(self.planner.tau[0]), self.system, self.up_bits, self.down_bits,
                            self.policies, t0)
        plan = self.planner.prune(drawn, clock.keep, clock.online)
        N = drawn.num_links
        extra_m, extra_d = np.zeros(N, dtype=np.int64), np.zeros(N, dtype=np.int64)
        if plan is not drawn and int(clock.dropped.sum()):
            sent = self.planner.prune(drawn, clock.online)
            tree = self.planner.tree
            extra_m = sent.messages() - plan.messages()
            extra_d = sent.downlinks(tree) - plan.downlinks(tree)
        return TimedRound(plan, drawn, clock, extra_m, extra_d)

    def timeline(self, t0: float = 0.0) -> Iterator[tuple[float, TimedRound]]:
        """Rounds 0, 1, 2, ... one after another: each with the virtual time it starts at (from ``t0``)."""
        t = 0
        while True:
            timed = self.round(t, t0)
            yield t0, timed
            t0 += timed.duration
            t += 1

    def start_of(self, t: int) -> float:
        """The virtual time round ``t`` starts at: rounds ``0 .. t-1`` timed again (nothing is trained)."""
        if self.buffered is not None:  # the end of a buffered run's round t - 1
            ends = list(islice(self.buffered_ends(), t))
            return ends[-1] if ends else 0.0
        t0 = 0.0
        for _, timed in islice(self.timeline(), t):
            t0 += timed.duration
        return t0

    def edges(self, timed: TimedRound) -> np.ndarray:
        """The edge of every device in ``timed``'s round (-1: it sits out)."""
        m = timed.drawn.members
        return (m if m is not None else Membership.of_tree(self.planner.tree)).edge_of

    def parent_changes(self, rounds: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, edges)``: the ``(round, device, edge)`` rows of rounds ``0 .. rounds-1`` in which a device's
        edge differs from the round before (round 0: from the tree's), and every device's edge in round
        ``rounds - 1``; the rounds are timed again (nothing is trained)."""
        edges = Membership.of_tree(self.planner.tree).edge_of
        parts = [np.zeros((0, 3), dtype=np.int64)]
        if self.dynamic:
            for t, (_, timed) in enumerate(islice(self.timeline(), rounds)):
                now = self.edges(timed)
                parts.append(changed_rows(edges, now, t))
                edges = now
        return np.concatenate(parts), edges

    def unmet_deadlines(self, timed: TimedRound) -> list[tuple[int, float]]:
        """``(layer, earliest arrival after the model was sent)`` for each ``deadline`` layer with
        ``min_children: 0`` whose aggregations in ``timed`` kept no child although children took part."""
        out = []
        for n, policy in enumerate(self.policies, start=1):
            if not (isinstance(policy, Deadline) and policy.min_children == 0):
                continue
            idx = [i for i, a in enumerate(timed.drawn.aggregations) if a.layer == n]
            live = [i for i in idx if timed.clock.online[i].any()]
            if live and not any(timed.clock.keep[i].any() for i in idx):
                out.append((n, float(min(timed.clock.earliest[i] for i in live))))
        return out


def _timed(timed: TimedRound) -> tuple[float, TimedRound]:
    return timed.duration, timed


def changed_rows(before: np.ndarray, now: np.ndarray, t: int) -> np.ndarray:
    """``(t, device, edge)`` int64 rows of the devices whose edge in ``now`` differs from ``before``."""
    d = np.flatnonzero(before != now)
    return np.stack([np.full(d.size, t, dtype=np.int64), d.astype(np.int64), now[d].astype(np.int64)], axis=1)
