"""The evaluation protocol of an optimiser against the clock (issue 24; docs/experiments.md), pure numpy.

A *grid* holds, for every candidate configuration and every evaluation seed, one long run's test accuracy after
each round and the virtual time at the end of each round.  The clock is deterministic, so one grid answers every
deadline: :func:`accuracy_at` re-reads a run at any deadline (the last evaluated accuracy whose round ended by
then; the initial accuracy before the first round ends).

For one *cell* (a deadline, a network model, a device-speed spread) :func:`cell` compares the optimiser's choice
with the baselines on the evaluation seeds (the search used seed 0 and a validation split; these are seeds 1..):

* the **median random draw**: per seed, the median accuracy over the random deadline-feasible draws; the choice
  *wins* the cell when its mean over the seeds is above the median draw's mean;
* the **oracle**: the candidate with the best mean over the seeds (the grid is the oracle's search space);
  the *regret* is the oracle's mean minus the choice's, in points;
* the **default** and the **most SGD steps per second of virtual time**, reported beside;
* a paired confidence interval for choice minus median draw: mean over seeds ± t(0.975, n-1) s.e.

:func:`summary` gives the win rate over cells and the mean regret, the numbers the issue's goal is stated in
(win in at least 80% of the cells, mean regret at most 1 point).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["T975", "Cell", "accuracy_at", "cell", "summary"]

# two-sided 95% Student t critical values by degrees of freedom (1..10), then the normal's
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(df: int) -> float:
    """The two-sided 95% t critical value for ``df`` degrees of freedom (``inf`` for none)."""
    if df < 1:
        return math.inf
    return T975[df - 1] if df <= len(T975) else 1.96


def accuracy_at(times: Sequence[float], acc: Sequence[float], deadline: float, initial: float = math.nan) -> float:
    """A run's accuracy at ``deadline`` seconds of virtual time: the last finite ``acc[r]`` whose round ended at
    ``times[r] <= deadline`` (``initial`` when no round has)."""
    t = np.asarray(times, dtype=np.float64)
    a = np.asarray(acc, dtype=np.float64)
    if t.shape != a.shape:
        raise ValueError(f"times {t.shape} and acc {a.shape}: one virtual time per round's accuracy")
    ok = np.flatnonzero((t <= deadline) & np.isfinite(a))
    return float(a[ok[-1]]) if ok.size else float(initial)


@dataclass(frozen=True)
class Cell:
    """One cell's comparison (accuracies as fractions; differences in points)."""

    chosen: str
    oracle: str
    chosen_mean: float
    median_draw_mean: float
    oracle_mean: float
    default_mean: float
    fastest_mean: float
    win: bool
    regret: float          # points: oracle - chosen
    diff: float            # points: chosen - median draw, mean over seeds
    half_width: float      # points: t(0.975, n-1) s.e. of that difference


def cell(scores: Mapping[str, Sequence[float]], chosen: str, draws: Sequence[str], default: str,
         fastest: str) -> Cell:
    """The cell's comparison from ``scores[config]`` = the accuracy at the cell's deadline on each evaluation seed
    (the same seeds, in the same order, for every config); ``draws`` the random feasible draws (at least one)."""
    if not draws:
        raise ValueError("a cell needs at least one random draw to compare with")
    names = [chosen, default, fastest, *draws]
    missing = [n for n in names if n not in scores]
    if missing:
        raise ValueError(f"configs {missing} have no scores in this cell")
    n = len(scores[chosen])
    if n < 1 or any(len(scores[k]) != n for k in scores):
        raise ValueError("every config needs one score per evaluation seed, the same seeds for all")
    s = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    median = np.median(np.stack([s[d] for d in draws]), axis=0)  # per seed, over the draws
    oracle = max(s, key=lambda k: (float(s[k].mean()), k))
    d = (s[chosen] - median) * 100.0
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return Cell(chosen, oracle, float(s[chosen].mean()), float(median.mean()), float(s[oracle].mean()),
                float(s[default].mean()), float(s[fastest].mean()), bool(s[chosen].mean() > median.mean()),
                100.0 * float(s[oracle].mean() - s[chosen].mean()), float(d.mean()), t975(n - 1) * se)


def summary(cells: Sequence[Cell]) -> tuple[float, float]:
    """``(win rate over the cells, mean regret in points)``."""
    if not cells:
        raise ValueError("no cells to summarise")
    return sum(c.win for c in cells) / len(cells), float(np.mean([c.regret for c in cells]))
