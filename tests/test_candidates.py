"""The deadline's candidates on the virtual clock and the baselines (analysis/candidates.py), checked by brute force
on a tiny config: feasibility at the deadline, distinct reproducible draws, the most-steps choice."""
from __future__ import annotations

import copy
import math

import pytest

from helpers import SMALL
from qmlhfl_mpi import load_config
from qmlhfl_mpi.analysis.candidates import deadline_grid, most_steps, random_draws
from qmlhfl_mpi.analysis.clockfit import ClockModel
from qmlhfl_mpi.config.build import model_dim


@pytest.fixture(scope="module")
def clock():
    raw = copy.deepcopy(SMALL)
    raw["latency"] = {"step_time": 0.01, "uplink_rate": [1e6, 1e6], "uplink_latency": [0.01, 0.2]}
    raw["system"] = {"speed": "lognormal(0.5)"}
    cfg = load_config(raw)
    return ClockModel(cfg, cfg.build_tree(), model_dim(cfg))


def test_the_grid_is_what_fits_the_deadline(clock):
    grid = deadline_grid(clock, 2, 5, 0.8, min_rounds=2)
    every = [(a, b) for a in range(1, 6) for b in range(1, 6)]
    for tau in every:
        fits = clock.durations(tau, 2).sum() <= 0.8
        assert (tau in grid) == fits, tau
    assert 0 < len(grid) < len(every) and grid == sorted(grid)
    with pytest.raises(ValueError, match="expected N, min_rounds >= 1, values >= 1 and a deadline > 0"):
        deadline_grid(clock, 2, 5, 0.0)


def test_draws_are_distinct_reproducible_and_the_fastest_is_the_most_steps(clock):
    grid = deadline_grid(clock, 2, 5, 1.5)
    draws = random_draws(grid, 10, seed=3)
    assert len(set(draws)) == len(draws) == min(10, len(grid)) and set(draws) <= set(grid)
    assert random_draws(grid, 10, seed=3) == draws and random_draws(grid, 10, seed=4) != draws
    assert sorted(random_draws(grid, 10_000, seed=3)) == grid
    best = most_steps(clock, grid, 1.5)
    steps = {tau: math.prod(tau) * clock.rounds_within(tau, 1.5) for tau in grid}
    assert steps[best] == max(steps.values())
    with pytest.raises(ValueError, match="empty grid"):
        most_steps(clock, [], 1.5)
