"""`optimize --search halving`: a model-free search for ``tau`` against the virtual clock (issue 24;
docs/theory.md section 18).  Not collective: the pilots run one after another in this process.

1. **Candidates.**  The deadline-feasible grid (:func:`~.candidates.deadline_grid` over ``tau_n`` in a value
   list, by default the powers of two up to ``--max-tau``) is thinned to ``k`` members by a greedy maximin
   (space-filling) design in ``log2 tau`` (:func:`space_filling`), which starts from the configured ``tau`` and the
   "most SGD steps by the deadline" member, so both are always tried.
2. **Successive halving.**  Every candidate trains, on a validation split of the training data
   (``data.validation``; the test set is never read), for the rounds that end within 20% of the deadline on the
   clock; the best ``1/eta`` by the global model's validation loss go on to 50%, and the best of those (at least
   two) to 100% (:func:`successive_halving`).  Every rung compares at the same virtual time: a candidate with no
   round within a rung's budget is not judged there and goes on.  A survivor continues its own run (its checkpoint is
   kept, ``output.keep_checkpoint``), so it trains each round once.  The choice is the lowest validation loss at
   100% of the deadline.
3. **Its cost** is every pilot step's process CPU time (core-seconds), reported beside the chosen candidate's own
   cumulative cost, which is one full run to the deadline.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..results.reader import read_run
from .candidates import deadline_grid_values, most_steps_by
from .clockfit import ClockModel

__all__ = ["SearchResult", "Trial", "power_values", "search", "space_filling", "successive_halving"]

Runner = Callable[[Config, bool], str]  # (config, resume) -> its results file; as calibrate.PilotRunner

FRACTIONS = (0.2, 0.5, 1.0)
_ONLY_LAST = 1 << 30  # a pilot's eval_every: it evaluates after its last round only (the same in every rung)


@dataclass(frozen=True)
class Trial:
    """One pilot step: ``tau`` trained to ``rounds`` (the rounds within ``budget`` virtual seconds)."""

    tau: tuple[int, ...]
    rung: int
    budget: float
    rounds: int
    score: float          # the global model's validation loss after ``rounds`` (inf: diverged; NaN: not judged)
    core_seconds: float   # process CPU seconds of this step (0 when no new round was needed)
    levels: tuple[int, ...] = ()  # the links' quantizer levels, when the search chooses them (0 = float32)


@dataclass(frozen=True)
class SearchResult:
    """The search: its candidates, every pilot step, and the choice."""

    deadline: float
    fractions: tuple[float, ...]
    eta: int
    candidates: tuple[tuple[int, ...], ...]   # tau, or tau then levels when the search chooses them
    trials: tuple[Trial, ...]
    chosen: tuple[int, ...]
    grid_size: int = 0
    chosen_levels: tuple[int, ...] = ()       # when the search chooses them

    @property
    def cost(self) -> float:
        """Core-seconds of every pilot step."""
        return math.fsum(t.core_seconds for t in self.trials)

    @property
    def full_run_cost(self) -> float:
        """Core-seconds the chosen ``tau`` took to reach the deadline: one full run."""
        return math.fsum(t.core_seconds for t in self.trials if (t.tau, t.levels) == (self.chosen, self.chosen_levels))

    def rung(self, r: int) -> list[Trial]:
        """The pilot steps of rung ``r`` (0-based), best first (those not judged last)."""
        return sorted((t for t in self.trials if t.rung == r),
                      key=lambda t: (math.isnan(t.score), t.score if not math.isnan(t.score) else 0.0, t.tau, t.levels))

    def lines(self) -> list[str]:
        """What `optimize` prints and writes into the config (one line per rung, then the cost)."""
        what = "(tau, levels)" if self.chosen_levels else "tau"
        out = [f"search: successive halving (eta {self.eta}) over {len(self.candidates)} space-filling candidates of "
               f"{self.grid_size} deadline-feasible {what}, scored by the validation loss at "
               f"{', '.join(f'{100 * f:g}%' for f in self.fractions)} of the {self.deadline:g} s deadline"]
        for r in range(len(self.fractions)):
            steps = self.rung(r)
            if steps:
                out.append(f"  rung {r + 1} ({steps[0].budget:.4g} s): " + "; ".join(
                    f"{_name(t.tau, t.levels)} {t.rounds} rounds loss {t.score:.5g}" if t.rounds else
                    f"{_name(t.tau, t.levels)} waits (no round within the budget)" for t in steps))
        chosen = f"tau = {list(self.chosen)}" + (f", levels = {list(self.chosen_levels)}" if self.chosen_levels else "")
        out.append(f"  chosen {chosen}; pilots cost {self.cost:.1f} core-s in {len(self.trials)} "
                   f"steps, {self.cost / self.full_run_cost if self.full_run_cost > 0 else math.nan:.2f} x one full "
                   f"run of the choice ({self.full_run_cost:.1f} core-s)")
        return out

    def to_json(self) -> str:
        """The whole search as one line of JSON (the written config records it)."""
        d = asdict(self)
        for t in d["trials"]:  # null: not judged at that rung (no round within its budget), or diverged
            t["score"] = t["score"] if math.isfinite(t["score"]) else None
        d["cost_core_seconds"], d["full_run_core_seconds"] = self.cost, self.full_run_cost
        return json.dumps(d, separators=(",", ":"), default=float, allow_nan=False)


def _name(tau: tuple[int, ...], levels: tuple[int, ...]) -> str:
    return f"{list(tau)}" + (f" s={list(levels)}" if levels else "")


def power_values(max_tau: int) -> tuple[int, ...]:
    """``1, 2, 4, ...`` up to ``max_tau`` (and ``max_tau`` itself)."""
    if max_tau < 1:
        raise ValueError(f"max_tau={max_tau!r}: expected an integer >= 1")
    vals = [1 << i for i in range(max_tau.bit_length()) if 1 << i <= max_tau]
    return tuple(sorted(set(vals) | {max_tau}))


def space_filling(grid: Sequence[tuple[int, ...]], k: int, first: Sequence[tuple[int, ...]] = (),
                  coords: Callable[[tuple[int, ...]], Sequence[float]] | None = None) -> list[tuple[int, ...]]:
    """``k`` members of ``grid`` (all when it has fewer): the members of ``first`` that are in the grid, then greedily
    the member farthest (Euclidean, in ``coords``: by default ``log2`` of every value) from those chosen; ties go
    to the earlier grid member."""
    if k < 1:
        raise ValueError(f"space_filling: k={k!r}: expected at least one candidate")
    members = [tuple(int(v) for v in t) for t in grid]
    if len(members) <= k:
        return members
    pts = (np.log2(np.array(members, dtype=np.float64)) if coords is None else
           np.array([coords(t) for t in members], dtype=np.float64))
    index = {t: i for i, t in enumerate(members)}
    chosen = list(dict.fromkeys(index[tuple(t)] for t in first if tuple(t) in index))[:k]
    if not chosen:
        chosen = [0]
    dist = np.min(np.linalg.norm(pts[:, None, :] - pts[None, chosen, :], axis=2), axis=1)
    while len(chosen) < k:
        i = int(np.argmax(dist))  # the first of the farthest
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(pts - pts[i], axis=1))
    return [members[i] for i in chosen]


def successive_halving(candidates: Sequence[tuple[int, ...]], deadline: float,
                       rounds_within: Callable[[tuple[int, ...], float], int],
                       train: Callable[[tuple[int, ...], int], tuple[float, float]],
                       fractions: Sequence[float] = FRACTIONS, eta: int = 3, final: int = 2,
                       grid_size: int = 0, split: Callable[[tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]
                       | None = None) -> SearchResult:
    """Successive halving (see the module doc).  ``rounds_within(tau, seconds)``: whole rounds of ``tau`` within
    ``seconds`` on the clock; ``train(tau, rounds)``: bring ``tau``'s pilot to ``rounds`` rounds (continuing its
    own earlier run) and return ``(validation loss, core-seconds)``.  Every rung compares the candidates at the
    same virtual time: a candidate none of whose rounds ends within the rung's budget is not judged there and
    goes on (score NaN, no cost).  Survivors of a rung: those waiting and the best ``ceil(n / eta)`` of the ``n``
    judged, but at least ``final`` of them (ties: the smaller ``tau`` in order).  ``split``: a candidate's
    ``(tau, levels)`` when the candidates carry levels too (default: the candidate is ``tau``)."""
    split = split or (lambda c: (c, ()))
    if not candidates:
        raise ValueError("successive_halving: no candidates (no tau fits the deadline)")
    fr = tuple(float(f) for f in fractions)
    if not fr or any(not 0 < f <= 1 for f in fr) or list(fr) != sorted(fr) or fr[-1] != 1.0:
        raise ValueError(f"fractions {list(fr)}: expected increasing shares of the deadline in (0, 1], the last 1")
    if eta < 2 or final < 1:
        raise ValueError(f"eta={eta!r}, final={final!r}: expected eta >= 2 and final >= 1")
    alive = [tuple(int(v) for v in t) for t in dict.fromkeys(tuple(c) for c in candidates)]
    done: dict[tuple[int, ...], tuple[int, float]] = {}  # tau -> (rounds trained, last score)
    trials: list[Trial] = []
    for r, f in enumerate(fr):
        scored, waiting = [], []
        for tau in alive:
            rounds = rounds_within(tau, f * deadline)
            have, score = done.get(tau, (0, math.nan))
            cost = 0.0
            if rounds > have:
                score, cost = train(tau, rounds)
                score = float(score) if math.isfinite(score) else math.inf
                done[tau] = (rounds, score)
            trials.append(Trial(split(tau)[0], r, f * deadline, max(rounds, have), score, float(cost), split(tau)[1]))
            if rounds == 0:  # no round ends within the budget: not judged yet, and it has cost nothing
                waiting.append(tau)
            else:
                scored.append((score, tau))
        scored.sort()
        if r + 1 < len(fr):
            keep = max(min(final, len(scored)), math.ceil(len(scored) / eta))
            alive = [tau for _, tau in scored[:keep]] + waiting
        elif not scored:
            raise ValueError(f"no candidate completes a round within the deadline {deadline:g} s")
        else:
            alive = [scored[0][1]]
    best = split(alive[0])
    return SearchResult(float(deadline), fr, int(eta), tuple(tuple(c) for c in candidates), tuple(trials), best[0],
                        grid_size, best[1])


def search(cfg: Config, clock: ClockModel, deadline: float, runner: Runner, *, values: Sequence[int],
           candidates: int = 12, eta: int = 3, validation: float = 0.1, workdir: str | Path | None = None,
           levels_values: Sequence[int] = (), clock_for: Callable[[Config], ClockModel] | None = None
           ) -> SearchResult:
    """The search of the module doc for ``cfg`` (its ``tau`` is the configured one) under ``deadline`` virtual
    seconds on ``clock``; ``runner`` trains the pilots, in a temporary directory under ``workdir``.
    ``levels_values``: also choose every link's QSGD levels among these (0 = float32); ``clock_for`` gives the
    clock of a config with other levels (its messages' sizes change)."""
    N = clock.tree.N
    if levels_values and clock_for is None:
        raise ValueError("search with levels_values needs clock_for, the clock of a config with other levels")
    # a candidate is tau, then (when the search chooses them) the links' levels; each levels setting has its clock
    level_sets = [()] if not levels_values else sorted(
        itertools.product(sorted({int(v) for v in levels_values}), repeat=N))

    def with_levels(levels: tuple[int, ...]) -> Config:
        return cfg if not levels else dataclasses.replace(cfg, quantizer=dataclasses.replace(cfg.quantizer,
                                                                                              levels=levels))

    clocks = {lv: clock if not lv or clock_for is None else clock_for(with_levels(lv)) for lv in level_sets}
    grid = [tau + lv for lv in level_sets for tau in deadline_grid_values(clocks[lv], N, values, deadline)]
    if not grid:
        raise ValueError(f"no tau with tau_n in {list(values)} completes a round within the deadline {deadline:g} s "
                         "on the virtual clock: raise --deadline")

    def split(c: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return c[:N], c[N:]

    def rounds_within(c: tuple[int, ...], seconds: float) -> int:
        return clocks[split(c)[1]].rounds_within(split(c)[0], seconds)

    top = max((v for v in levels_values if v > 0), default=1)
    coords = None if not levels_values else (  # log2 tau, log2 s (float32 as one octave above the finest s)
        lambda c: [math.log2(v) for v in c[:N]] + [math.log2(v if v > 0 else 2 * top) for v in c[N:]])
    configured = tuple(cfg.tau) + (tuple(cfg.quantizer.levels) if levels_values else ())
    if (configured not in grid and len(configured) == N + len(level_sets[0])
            and clock.rounds_within(tuple(cfg.tau), deadline) >= 1):
        grid.append(configured)  # the configured choice is always a candidate when it fits the deadline
        clocks.setdefault(split(configured)[1], clock)
    first = [configured, most_steps_by(grid, lambda c: rounds_within(c, deadline), N)]
    cands = space_filling(grid, candidates, first, coords)
    if cfg.data.validation > 0:
        validation = cfg.data.validation
    if not 0 < validation <= 0.5:
        raise ValueError(f"--validation {validation!r}: expected a share of the training data in (0, 0.5]")

    with tempfile.TemporaryDirectory(prefix="qmlhfl-search-", dir=workdir) as tmp:
        def train(c: tuple[int, ...], rounds: int) -> tuple[float, float]:
            tau, levels = split(c)
            path = str(Path(tmp) / f"tau{'_'.join(map(str, c))}.h5")
            pcfg = dataclasses.replace(
                with_levels(levels), tau=tau, data=dataclasses.replace(cfg.data, validation=validation),
                train=dataclasses.replace(cfg.train, rounds=rounds, eval_every=_ONLY_LAST),
                output=dataclasses.replace(cfg.output, path=path, checkpoint_every=0, keep_checkpoint=True,
                                           csv=False, tensorboard=""))
            t0 = time.process_time()
            out = runner(pcfg, Path(path).exists())
            cost = time.process_time() - t0
            loss = np.asarray(read_run(out)["metrics"]["test_loss"], dtype=np.float64)
            return float(loss[-1]) if loss.size else math.inf, cost

        return successive_halving(cands, deadline, rounds_within, train, eta=eta, grid_size=len(grid), split=split)
