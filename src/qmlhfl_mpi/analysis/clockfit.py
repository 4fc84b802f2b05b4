"""The virtual clock for `check` and `optimize` (docs/system.md): round times of any ``tau`` on the configured
system, what dominates them, and the closed form fitted to the clock.

`optimize` searches ``tau`` with the closed form's structure (docs/theory.md), ``prod(tau) s + sum_n
prod(tau_{n+1..N}) c_n``; here ``s`` and ``c_n`` are fitted by least squares to the clock's mean round time
over a design of ``tau`` values (all ones, each ``tau_n`` at 2 and 4, the configured one), so the search sees
the slow devices, the downlinks, the contention and the policies of the system model, and the answer's rounds
are then counted on the clock itself.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from ..config import Config
from ..config import build as builders
from ..core.clock import LinkTimes, SystemModel
from ..core.mobility import Mobility
from ..core.plan import Planner
from ..core.scheduler import RoundScheduler
from ..core.theory import LatencyModel, message_bits
from ..core.topology import Tree

__all__ = ["ClockModel", "Dominance"]


@dataclass(frozen=True)
class Dominance:
    """What a round's virtual time is made of: the mean without compute and without each link's time."""

    mean: float
    without_compute: float
    without_link: tuple[float, ...]
    last_device: int            # the device the rounds waited for most often
    last_share: float           # in this share of the rounds

    def lines(self) -> list[str]:
        parts = [("compute", self.without_compute)] + [(f"link {n}", t) for n, t in
                                                       enumerate(self.without_link, start=1)]
        saved = [(name, 1 - t / self.mean if self.mean > 0 else 0.0) for name, t in parts]
        top = max(saved, key=lambda x: x[1])
        path = (f"critical path: ends at device {self.last_device} in {100 * self.last_share:.0f}% of the rounds"
                if self.last_device >= 0 else "critical path: every round ended at a deadline timer, not a device")
        return [f"what the round waits for: {', '.join(f'{name} {100 * s:.0f}%' for name, s in saved)} of its "
                f"time (the round without it); dominant: {top[0]}", path]


class ClockModel:
    """Round schedulers of one config for any ``tau`` (the system model built once: its traces read once)."""

    def __init__(self, cfg: Config, tree: Tree, dim: int) -> None:
        self.cfg, self.tree = cfg, tree
        self.system = builders.system(cfg, tree)
        self.policies = builders.policies(cfg)
        self.participation = builders.participation(cfg)
        self.mobility = builders.mobility(cfg, tree)
        codecs = builders.codecs(cfg)
        self.up_bits = tuple(message_bits(dim, codecs))
        self.down_bits = tuple(8 * (4 * dim if c is None else c.nbytes(dim)) for c in builders.downlink_codecs(cfg))

    def scheduler(self, tau: Sequence[int], system: SystemModel | None = None,
                  samples: np.ndarray | None = None) -> RoundScheduler:
        """Rounds of ``tau`` on ``system`` (default: the configured one); ``samples`` weight children by samples."""
        planner = Planner(self.tree, tuple(int(t) for t in tau), self.participation, self.cfg.train.seed, samples)
        mobility = Mobility(self.tree, self.mobility.model, self.mobility.failures)  # its own: it keeps a state
        return RoundScheduler(planner, system or self.system, self.policies, self.up_bits, self.down_bits, mobility)

    def durations(self, tau: Sequence[int], rounds: int, system: SystemModel | None = None) -> np.ndarray:
        """The virtual seconds of rounds ``0 .. rounds-1`` run one after another."""
        sched = self.scheduler(tau, system)
        if sched.buffered is not None:  # a buffered run's rounds end with the cloud's last update
            return np.diff(np.array([0.0, *islice(sched.buffered_ends(), rounds)]))
        return np.array([timed.duration for _, timed in islice(sched.timeline(), rounds)])

    def rounds_within(self, tau: Sequence[int], deadline: float, cap: int = 100_000) -> int:
        """How many whole rounds of ``tau`` end within ``deadline`` virtual seconds (at most ``cap``)."""
        sched = self.scheduler(tau)
        if sched.buffered is not None:
            for t, end in enumerate(islice(sched.buffered_ends(), cap)):
                if end > deadline:
                    return t
            return cap
        for t, (t0, timed) in enumerate(islice(sched.timeline(), cap)):
            if t0 + timed.duration > deadline:
                return t
        return cap

    def dominance(self, tau: Sequence[int], rounds: int) -> Dominance:
        """The mean round time, and what it would be without compute and without each link's time."""
        times, last = [], []
        for _, timed in islice(self.scheduler(tau).timeline(), rounds):
            times.append(timed.duration)
            last.append(int(timed.critical_path()[0]))
        free = [dataclasses.replace(lk, up_rate=np.full_like(lk.up_rate, np.inf), up_latency=np.zeros_like(lk.up_latency),
                                    down_rate=np.full_like(lk.down_rate, np.inf),
                                    down_latency=np.zeros_like(lk.down_latency), shared=False)
                for lk in self.system.links]
        no_compute = dataclasses.replace(self.system, step_seconds=np.zeros_like(self.system.step_seconds))
        without_link = []
        for n in range(len(free)):
            links: list[LinkTimes] = list(self.system.links)
            links[n] = free[n]
            without_link.append(float(self.durations(tau, rounds, dataclasses.replace(self.system,
                                                                                      links=tuple(links))).mean()))
        ends = [d for d in last if d >= 0]
        top = max(set(ends), key=ends.count) if ends else -1
        return Dominance(float(np.mean(times)), float(self.durations(tau, rounds, no_compute).mean()),
                         tuple(without_link), top, ends.count(top) / len(last) if ends else 0.0)

    def fitted_latency(self, tau: Sequence[int], rounds: int = 3) -> tuple[LatencyModel, float]:
        """The closed form's ``(step_time, per-link cost)`` fitted to the clock (see the module doc), as a
        :class:`LatencyModel` with the configured rates (the latencies absorb the rest of each cost, at least 0),
        and that model's largest relative error over the design."""
        N = self.tree.N
        design = [tuple([1] * N), tuple(int(t) for t in tau)]
        for n in range(N):
            for v in (2, 4):
                design.append(tuple(v if i == n else 1 for i in range(N)))
        design = list(dict.fromkeys(design))
        A = np.array([[float(np.prod(d))] + [float(np.prod(d[n:])) for n in range(1, N + 1)] for d in design])
        y = np.array([self.durations(d, rounds).mean() for d in design])
        coef = np.maximum(np.linalg.lstsq(A, y, rcond=None)[0], 0.0)
        rates = builders.latency(self.cfg).uplink_rate
        lat = tuple(max(float(coef[n + 1]) - self.up_bits[n] / rates[n], 0.0) for n in range(N))
        model = LatencyModel(float(coef[0]), rates, lat)
        used = np.array([model.step_time] + [self.up_bits[n] / rates[n] + lat[n] for n in range(N)])
        return model, float(np.max(np.abs(A @ used - y) / np.maximum(y, 1e-300)))
