"""The virtual clock of a round: when every aggregation of a :class:`~.plan.RoundPlan` starts and ends on a given
network, computed before anything is trained (pure).

Timing never depends on model values: message sizes are the codecs' byte
lengths, compute is the system model's seconds per SGD step.  So every rank
computes the same clock from the plan.  The rules (docs/system.md):

* a node's aggregation starts when the node holds the model it starts from
  (the cloud at the start of the round; a node's first repetition when its
  parent's model reaches it; a later repetition when its own previous one
  ends);
* a child receives that model after the link's downlink time (latency plus
  bits over rate; zero without a downlink model, as the paper assumes);
* a device finishes ``tau_1`` steps of its own speed later; a child node
  after its ``tau_n`` repetitions;
* its message reaches the parent after the uplink's latency plus bits over
  rate, or, with ``shared`` ingress, after its share of the parent's ingress
  rate while other messages are in flight (processor sharing);
* the aggregation ends when its policy (:mod:`.policy`) says: when the last
  participant's message has arrived (``all``, the paper's), at a deadline,
  or at the ``k``-th arrival; the children it does not keep are dropped
  (timed, never trained); the round ends with the cloud's;
* a device offline (:class:`~.system.Availability`) when its parent starts
  an aggregation takes no part in it.

With one speed for every device, no downlink time and no sharing, a round
lasts ``prod(tau) t_step + sum_n prod(tau_{n+1..N}) (bits_n / R_n + lat_n)``,
the closed form of :func:`~.theory.round_time` (tested).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import rng
from .plan import RoundPlan
from .policy import All, Policy
from .system import Availability, Distribution, SystemSpec, jitter_factors, once_factors
from .theory import LatencyModel
from .topology import Tree

__all__ = ["LinkTimes", "RoundClock", "SystemModel", "processor_sharing", "round_clock"]


def processor_sharing(ready: np.ndarray, bits: np.ndarray, rate: float) -> np.ndarray:
    """When each transfer of ``bits[i]`` bits, ready at ``ready[i]``, completes over one channel of ``rate`` bits/s
    shared equally by the transfers in flight (egalitarian processor sharing).  Pure; exact for piecewise-constant
    shares (the next event is an arrival or the smallest remaining transfer finishing)."""
    ready, bits = np.asarray(ready, dtype=np.float64), np.asarray(bits, dtype=np.float64)
    if rate <= 0 or not np.isfinite(rate):
        raise ValueError(f"rate = {rate!r}: expected a finite number > 0 of bits per second")
    n = len(ready)
    done = np.full(n, np.nan)
    order = np.argsort(ready, kind="stable")
    left = bits.copy()
    active: list[int] = []
    t, k = (float(ready[order[0]]) if n else 0.0), 0
    while k < n or active:
        while k < n and ready[order[k]] <= t:
            active.append(int(order[k]))
            k += 1
        if not active:
            t = float(ready[order[k]])
            continue
        share = rate / len(active)
        first_done = min(left[i] for i in active) / share
        next_arrival = float(ready[order[k]]) - t if k < n else np.inf
        step = min(first_done, next_arrival)
        for i in active:
            left[i] -= share * step
        t += step
        finished = {i for i in active if left[i] <= 1e-9 * max(bits[i], 1.0)}
        for i in finished:
            done[i] = t
            left[i] = 0.0
        active = [i for i in active if i not in finished]
    return done


@dataclass(frozen=True)
class LinkTimes:
    """Link ``n`` for every child node at layer ``n-1`` (arrays of its length): uplink and downlink rates (bits/s)
    and latencies (s); ``shared``: the messages to one parent share ``ingress_rate`` (bits/s)."""

    up_rate: np.ndarray
    up_latency: np.ndarray
    down_rate: np.ndarray     # inf: the downlink takes no time
    down_latency: np.ndarray
    shared: bool = False
    ingress_rate: float = float("inf")

    def up_seconds(self, children: np.ndarray, bits: int) -> np.ndarray:
        """Transfer plus latency of one message of ``bits`` from each child (without sharing)."""
        return bits / self.up_rate[children] + self.up_latency[children]

    def down_seconds(self, children: np.ndarray, bits: int) -> np.ndarray:
        """When the parent's model reaches each child after the parent holds it."""
        rate = self.down_rate[children]
        return np.where(np.isinf(rate), 0.0, bits / rate) + self.down_latency[children]


@dataclass(frozen=True)
class SystemModel:
    """Seconds per local SGD step of every device, every link's times, the per-round jitter of the devices'
    steps and their availability in time (see the module doc and :mod:`.system`)."""

    step_seconds: np.ndarray            # per device
    links: tuple[LinkTimes, ...]        # links 1..N
    jitter: Distribution = Distribution()
    availability: Availability | None = None
    seed: int | None = None             # the jitter's draws (None: the run's seed, given per round)

    @classmethod
    def uniform(cls, tree: Tree, latency: LatencyModel) -> SystemModel:
        """The closed form's network: one step time for every device, one rate and latency per link, no
        downlink time and no sharing."""
        return cls.build(tree, latency, SystemSpec(), 0)

    @classmethod
    def build(cls, tree: Tree, latency: LatencyModel, spec: SystemSpec, seed: int) -> SystemModel:
        """The system of ``spec`` on ``tree`` over the base values of ``latency`` (docs/system.md): traces replace
        the base values they give (step times, rates, latencies), then the drawn factors (speed, link spread)
        multiply the step times and rates, traced or not."""
        N, D = tree.N, tree.num_devices
        trace = spec.device_trace
        step = np.full(D, latency.step_time) if trace is None else trace.step_seconds[trace.rows(D)]
        step = step * once_factors(spec.speed, (seed, rng.SYSTEM, rng.SPEED), D)
        links = []
        for n in range(1, N + 1):
            C = tree.num_nodes(n - 1)
            spread = spec.link_spread[n - 1] if spec.link_spread else Distribution()
            factor = once_factors(spread, (seed, rng.SYSTEM, rng.LINK, n), C)
            down = spec.down_rate[n - 1] if spec.down_rate else 0.0
            up_rate = np.full(C, latency.uplink_rate[n - 1])
            down_rate = np.full(C, down if down > 0 else np.inf)
            up_lat = np.full(C, latency.uplink_latency[n - 1])
            down_lat = np.full(C, spec.down_latency[n - 1] if spec.down_latency else 0.0)
            if n == 1 and trace is not None:
                rows = trace.rows(D)
                up_rate = np.where(np.isnan(trace.up_rate[rows]), up_rate, trace.up_rate[rows])
                down_rate = np.where(np.isnan(trace.down_rate[rows]), down_rate, trace.down_rate[rows])
            if spec.link_trace is not None:
                lt = spec.link_trace
                mine = lt.link == n
                for name, arr in (("up_rate", up_rate), ("up_latency", up_lat), ("down_rate", down_rate),
                                  ("down_latency", down_lat)):
                    vals = lt.values.get(name)
                    if vals is not None:
                        rows = mine & ~np.isnan(vals)
                        arr[lt.child[rows]] = vals[rows]
            up_rate, down_rate = up_rate * factor, down_rate * factor  # inf stays inf: no downlink time
            shared = bool(spec.shared[n - 1]) if spec.shared else False
            ingress = (spec.ingress_rate[n - 1] if spec.ingress_rate else 0.0) or latency.uplink_rate[n - 1]
            links.append(LinkTimes(up_rate, up_lat, down_rate, down_lat, shared, float(ingress)))
        return cls(step, tuple(links), spec.jitter, spec.availability, seed)

    def device_steps(self, devices: np.ndarray, seed: int, round_: int) -> np.ndarray:
        """Seconds per SGD step of ``devices`` in round ``round_`` (their jitter drawn from the system's seed, else
        ``seed``)."""
        return self.step_seconds[devices] * jitter_factors(self.jitter, seed if self.seed is None else self.seed,
                                                           round_, devices)


@dataclass
class RoundClock:
    """When a round's aggregations start and end (seconds since the round started), what the round waited for,
    and what each aggregation kept (its policy) and found offline (per aggregation of the plan it timed)."""

    start: np.ndarray                   # per aggregation of the plan
    end: np.ndarray
    link_busy: np.ndarray               # per link: seconds of transfer (bits over rate, summed over messages)
    device_finish: list[float] = field(default_factory=list)   # each timed device's finish (dropped too)
    last: list[int] = field(default_factory=list)              # per aggregation: the participant it waited for last
    keep: list[np.ndarray] = field(default_factory=list)       # per aggregation: mask of the participants kept
    online: list[np.ndarray] = field(default_factory=list)     # per aggregation: mask of the participants online
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # per link
    offline: int = 0                                           # participating devices found offline
    earliest: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per aggregation: first arrival - start

    @property
    def duration(self) -> float:
        """The round's virtual seconds: the end of the cloud's aggregation."""
        return float(self.end[0]) if len(self.end) else 0.0

    def critical_path(self, plan: RoundPlan) -> list[tuple[int, int]]:
        """``(layer, node)`` from the cloud down to the device the round waited for last (it stops at a node
        that waited for its deadline, or had nobody to wait for)."""
        out: list[tuple[int, int]] = []
        subs = _subaggregations(plan)
        i = 0
        while i >= 0 and len(plan.aggregations):
            a = plan.aggregations[i]
            out.append((a.layer, a.node))
            j = self.last[i]
            if j < 0:
                break
            if a.layer == 1:
                out.append((0, int(a.children[j])))
                break
            i = subs[i][j][-1]  # the child's last repetition
        return out

    def finish_percentiles(self, q: Sequence[float]) -> np.ndarray:
        """Percentiles ``q`` of the finish times of the devices that took part, dropped ones included (they were
        timed: the spread the policies cut); NaN when none did."""
        if not self.device_finish:
            return np.full(len(q), np.nan)
        return np.percentile(np.asarray(self.device_finish), q)


def _subaggregations(plan: RoundPlan) -> list[list[list[int]]]:
    """For every aggregation, per participant, the indices of that child's repetitions in order."""
    subs: list[list[list[int]]] = [[[] for _ in a.children] for a in plan.aggregations]
    for i, a in enumerate(plan.aggregations):
        if a.parent >= 0:
            subs[a.parent][a.slot].append(i)
    return subs


def round_clock(plan: RoundPlan, tau1: int, system: SystemModel, up_bits: Sequence[int], down_bits: Sequence[int],
                policies: Sequence[Policy] | None = None, t0: float = 0.0) -> RoundClock:
    """The virtual clock of ``plan`` on ``system`` (see the module doc): ``up_bits[n-1]`` and ``down_bits[n-1]`` are
    the bits of one uplink message and of one downlink model on link ``n``; ``policies[n-1]`` decides whom layer
    ``n`` aggregates (default: everyone); ``t0`` is the virtual time the round starts at (for availability).
    Every participant is timed, a dropped one included; a device offline when its parent starts the aggregation
    takes no part."""
    aggs = plan.aggregations
    subs = _subaggregations(plan)
    N = plan.num_links
    everyone = All()
    clock = RoundClock(np.zeros(len(aggs)), np.zeros(len(aggs)), np.zeros(N), [], [-1] * len(aggs),
                       [np.zeros(0, dtype=bool)] * len(aggs), [np.zeros(0, dtype=bool)] * len(aggs),
                       np.zeros(N, dtype=np.int64), 0, np.full(len(aggs), np.nan))

    def run(i: int, t_model: float) -> float:
        a = aggs[i]
        clock.start[i] = t_model
        n, kids = a.layer, a.children
        online = np.ones(len(kids), dtype=bool)
        if n == 1 and system.availability is not None and len(kids):
            online = system.availability.online(kids, t0 + t_model)
            clock.offline += int(len(kids) - online.sum())
        clock.online[i] = online
        live = np.flatnonzero(online)
        if len(live) == 0:
            clock.keep[i] = online
            clock.end[i] = t_model
            return t_model
        link = system.links[n - 1]
        kids_live = kids[live]
        begin = t_model + link.down_seconds(kids_live, down_bits[n - 1])
        if n == 1:
            ready = begin + tau1 * system.device_steps(kids_live, plan.seed, plan.round)
            clock.device_finish.extend(ready.tolist())
        else:
            ready = np.empty(len(live))
            for j, slot in enumerate(live.tolist()):
                t = float(begin[j])
                for k in subs[i][slot]:
                    t = run(k, t)
                ready[j] = t
        bits = up_bits[n - 1]
        clock.link_busy[n - 1] += float(np.sum(bits / (np.full(len(live), link.ingress_rate) if link.shared
                                                      else link.up_rate[kids_live])))
        if link.shared:
            arrive = processor_sharing(ready, np.full(len(live), float(bits)), link.ingress_rate) \
                + link.up_latency[kids_live]
        else:
            arrive = ready + link.up_seconds(kids_live, bits)
        clock.earliest[i] = float(arrive.min()) - t_model
        policy = policies[n - 1] if policies is not None else everyone
        kept, end, last = policy.select(arrive, t_model)
        keep = np.zeros(len(kids), dtype=bool)
        keep[live[kept]] = True
        clock.keep[i] = keep
        clock.dropped[n - 1] += len(live) - int(kept.sum())
        clock.last[i] = int(live[last]) if last >= 0 else -1
        clock.end[i] = end
        return end

    if aggs:
        run(0, 0.0)
    return clock
