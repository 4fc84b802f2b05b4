"""The candidate ``tau`` of a deadline on the virtual clock, and the baselines an optimiser is judged against
(issue 24, docs/experiments.md): not collective, no MPI.

* :func:`deadline_grid`: every ``tau`` in ``[1, max_tau]^N`` of which at least ``min_rounds`` whole rounds end
  within the deadline on the clock (``ClockModel``: the configured system model, stragglers and policies
  included).  No fitted condition restricts it.
* :func:`random_draws`: ``k`` distinct members of the grid, from the stream ``(seed, DRAWS)``.
* :func:`most_steps`: the member that completes the most local SGD steps by the deadline, ``K`` times the rounds
  that fit (ties: the smaller ``K``, then the smaller ``tau`` in order) -- the "fastest" baseline.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

from ..core import rng
from .clockfit import ClockModel

__all__ = ["deadline_grid", "deadline_grid_values", "most_steps", "most_steps_by", "random_draws"]


def deadline_grid(clock: ClockModel, N: int, max_tau: int, deadline: float, min_rounds: int = 1
                  ) -> list[tuple[int, ...]]:
    """The deadline-feasible ``tau`` (ascending), each with at least ``min_rounds`` rounds within ``deadline``."""
    if max_tau < 1:
        raise ValueError(f"deadline_grid: max_tau={max_tau!r}: expected an integer >= 1")
    return deadline_grid_values(clock, N, range(1, max_tau + 1), deadline, min_rounds)


def deadline_grid_values(clock: ClockModel, N: int, values: Sequence[int], deadline: float, min_rounds: int = 1
                         ) -> list[tuple[int, ...]]:
    """As :func:`deadline_grid`, over ``tau_n`` in ``values`` (ascending, distinct, >= 1)."""
    vals = sorted({int(v) for v in values})
    if not vals or vals[0] < 1 or N < 1 or not deadline > 0 or min_rounds < 1:
        raise ValueError(f"deadline_grid_values: N={N!r}, values={list(values)!r}, deadline={deadline!r}, "
                         f"min_rounds={min_rounds!r}: expected N, min_rounds >= 1, values >= 1 and a deadline > 0")
    return [tau for tau in itertools.product(vals, repeat=N)
            if clock.rounds_within(tau, deadline, cap=min_rounds) >= min_rounds]


def random_draws(grid: Sequence[tuple[int, ...]], k: int, seed: int) -> list[tuple[int, ...]]:
    """``k`` distinct members of ``grid`` (all of them when it has fewer), from the stream ``(seed, DRAWS)``."""
    if k < 0:
        raise ValueError(f"random_draws: k={k!r}: expected a count >= 0")
    picks = rng.stream(seed, rng.DRAWS).permutation(len(grid))[:k]
    return [tuple(grid[int(i)]) for i in picks]


def most_steps(clock: ClockModel, grid: Sequence[tuple[int, ...]], deadline: float,
               cap: int = 100_000) -> tuple[int, ...]:
    """The member of ``grid`` with the most SGD steps by ``deadline``: ``prod(tau)`` times its rounds that fit."""
    return most_steps_by(grid, lambda tau: clock.rounds_within(tau, deadline, cap))


def most_steps_by(grid: Sequence[tuple[int, ...]], rounds: Callable[[tuple[int, ...]], int],
                  width: int | None = None) -> tuple[int, ...]:
    """As :func:`most_steps`, with ``rounds(member)`` the rounds that fit; a member's ``tau`` is its first
    ``width`` entries (default: all; the rest may be other choices, e.g. levels).  Ties: the smaller ``K``, then
    the smaller member."""
    if not grid:
        raise ValueError("most_steps: an empty grid (no tau fits the deadline)")

    def key(c: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        K = math.prod(c[:width])
        return -K * rounds(c), K, c

    return min(grid, key=key)
