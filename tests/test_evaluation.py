"""The optimiser's evaluation protocol (analysis/evaluation.py) on tiny grids whose answers are known by hand: a run
re-read at any deadline, the median random draw, the oracle, the regret, the paired interval, the summary."""
from __future__ import annotations

import math

import pytest

from qmlhfl_mpi.analysis.evaluation import accuracy_at, cell, summary, t975


def test_a_run_is_re_read_at_any_deadline():
    times, acc = [1.0, 2.0, 3.5, 5.0], [0.2, float("nan"), 0.6, 0.7]
    assert math.isnan(accuracy_at(times, acc, 0.5))
    assert accuracy_at(times, acc, 0.5, initial=0.1) == 0.1
    assert accuracy_at(times, acc, 2.5) == 0.2  # round 1 was not evaluated: round 0's accuracy stands
    assert accuracy_at(times, acc, 3.5) == 0.6 and accuracy_at(times, acc, 100) == 0.7
    with pytest.raises(ValueError, match="one virtual time per round"):
        accuracy_at([1.0], [0.1, 0.2], 1.0)


GRID = {  # accuracy at one deadline on 3 evaluation seeds
    "best": [0.90, 0.92, 0.91],
    "chosen": [0.88, 0.90, 0.89],
    "default": [0.80, 0.81, 0.79],
    "fast": [0.85, 0.84, 0.86],
    "d1": [0.70, 0.72, 0.71], "d2": [0.86, 0.85, 0.87], "d3": [0.80, 0.82, 0.78],
}


def test_a_cell_with_a_known_oracle_and_median_draw():
    c = cell(GRID, "chosen", ["d1", "d2", "d3"], "default", "fast")
    assert c.oracle == "best" and c.win
    assert c.median_draw_mean == pytest.approx((0.80 + 0.82 + 0.78) / 3)  # per seed medians 0.80, 0.82, 0.78
    assert c.regret == pytest.approx(2.0)  # 0.91 - 0.89
    diffs = [8.0, 8.0, 11.0]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert c.diff == pytest.approx(mean) and c.half_width == pytest.approx(4.303 * sd / math.sqrt(3))
    lost = cell(GRID, "d1", ["d1", "d2", "d3"], "default", "fast")
    assert not lost.win and lost.regret == pytest.approx(20.0)
    assert summary([c, lost]) == (0.5, pytest.approx(11.0))
    assert cell(GRID, "best", ["d2"], "default", "fast").regret == 0.0


def test_bad_cells_are_refused():
    with pytest.raises(ValueError, match="at least one random draw"):
        cell(GRID, "chosen", [], "default", "fast")
    with pytest.raises(ValueError, match=r"configs \['nope'\] have no scores"):
        cell(GRID, "nope", ["d1"], "default", "fast")
    with pytest.raises(ValueError, match="one score per evaluation seed"):
        cell({**GRID, "d1": [0.7]}, "chosen", ["d1"], "default", "fast")
    with pytest.raises(ValueError, match="no cells"):
        summary([])
    assert t975(1) == 12.706 and t975(30) == 1.96 and math.isinf(t975(0))
