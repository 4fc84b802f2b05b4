"""core/optimize.py: exact deadline optimisation of tau and random feasible baselines.

The reference objective here is assembled from the public theory functions
(``round_time``, ``convergence_bound``, ``lr_condition``), independently of the
optimiser's internal (vectorised) scoring.
"""
import itertools
import math
import time

import numpy as np
import pytest

from qmlhfl_mpi.core.codecs import link_codecs
from qmlhfl_mpi.core.optimize import OptimResult, optimize_tau, random_feasible
from qmlhfl_mpi.core.theory import (
    LatencyModel,
    convergence_bound,
    lr_condition,
    q_per_link,
    round_time,
)
from qmlhfl_mpi.core.topology import Tree


def reference(tau, d, levels, bucket, tree, lat, deadline, L, lr, sigma2, gap0, zeta2=0.0):
    """(objective, T) of ``tau``; objective inf when infeasible."""
    codecs = link_codecs(levels, bucket)
    rt = round_time(d, tau, codecs, tree, lat)
    T = math.floor(deadline / rt)
    qs = q_per_link(d, codecs)
    if T < 1 or not lr_condition(lr, L, tau, qs, tree) > 0:
        return math.inf, T
    return convergence_bound(T, lr, L, tau, qs, tree, sigma2, gap0, zeta2), T


def test_hand_example_N1():
    # 1 s per step, 10 s per aggregation, deadline 100 s, no noise: maximise T*K with
    # T = floor(100 / (K + 10)): K = 40 gives 2 * 40 = 80 (K = 23: 69, K = 50: 50)
    lat = LatencyModel(1.0, (1e30,), (10.0,))
    r = optimize_tau(10, link_codecs([0], 0), Tree.from_nested(3), lat, 100.0, 1.0, 0.001, 50, sigma2=0.0, gap0=1.0,
                     n_random=50)
    assert isinstance(r, OptimResult)
    assert r.tau == (40,) and r.T == 2 and r.steps == 80
    assert r.round_time == pytest.approx(50.0)
    assert r.objective == pytest.approx(2 * 1.0 / (0.001 * 80))
    assert len(r.random_objectives) == 50 and r.beaten_fraction == 1.0


CASES = [
    # N, tree spec, levels, max_tau, lr, deadline, latency (step, rates, lats), zeta2
    (1, 8, [4], 50, 2e-3, 500.0, (0.01, (1e6,), (0.05,)), 0.0),
    (2, [3, 2], [8, 2], 20, 1e-3, 2000.0, (0.01, (1e7, 1e5), (0.001, 0.2)), 0.5),
    (2, [[2, 2], [3]][0], [0, 16], 20, 5e-4, 1e4, (0.02, (1e8, 1e6), (0.0, 1.0)), 1.0),
    (3, [[3, 1], [2]], [16, 8, 4], 10, 1e-3, 5e3, (0.01, (1e8, 1e7, 1e6), (0.001, 0.05, 0.5)), 0.2),
    (3, [[2, 2], [2, 2]], [2, 2, 0], 10, 1e-4, 1e5, (0.05, (1e8, 1e7, 1e6), (0.001, 0.1, 2.0)), 0.0),
]


@pytest.mark.parametrize("N,spec,levels,max_tau,lr,deadline,latcfg,zeta2", CASES)
def test_matches_exhaustive_search(N, spec, levels, max_tau, lr, deadline, latcfg, zeta2):
    tree = Tree.from_nested(spec)
    lat = LatencyModel(latcfg[0], latcfg[1], latcfg[2])
    d, L, s2, g0 = 5000, 2.0, 0.5, 3.0
    r = optimize_tau(d, link_codecs(levels, 512), tree, lat, deadline, L, lr, max_tau, sigma2=s2, gap0=g0, zeta2=zeta2,
                     n_random=10)
    best = math.inf
    for tau in itertools.product(range(1, max_tau + 1), repeat=N):
        obj = reference(tau, d, levels, 512, tree, lat, deadline, L, lr, s2, g0, zeta2)[0]
        best = min(best, obj)
    assert math.isfinite(best)
    assert r.objective == pytest.approx(best, rel=1e-12)
    assert reference(r.tau, d, levels, 512, tree, lat, deadline, L, lr, s2, g0, zeta2)[0] == pytest.approx(best,
                                                                                                         rel=1e-12)


@pytest.mark.parametrize("N,spec,levels,max_tau,lr,deadline,latcfg,zeta2", CASES[1:4])
def test_beats_every_random_feasible_choice_and_meets_the_deadline(N, spec, levels, max_tau, lr, deadline,
                                                                     latcfg, zeta2):
    tree = Tree.from_nested(spec)
    lat = LatencyModel(*latcfg)
    d, L, s2, g0 = 5000, 2.0, 0.5, 3.0
    r = optimize_tau(d, link_codecs(levels, 512), tree, lat, deadline, L, lr, max_tau, sigma2=s2, gap0=g0, zeta2=zeta2,
                     n_random=1000, seed=7)
    obj, T = reference(r.tau, d, levels, 512, tree, lat, deadline, L, lr, s2, g0, zeta2)
    assert obj == pytest.approx(r.objective, rel=1e-12) and T == r.T >= 1
    assert r.T * r.round_time <= deadline
    assert r.round_time == pytest.approx(round_time(d, r.tau, link_codecs(levels, 512), tree, lat), rel=1e-15)
    assert lr_condition(lr, L, r.tau, q_per_link(d, link_codecs(levels, 512)), tree) > 0
    assert r.max_lr > lr and r.steps == r.T * math.prod(r.tau)
    draws = random_feasible(d, link_codecs(levels, 512), tree, lat, deadline, L, lr, max_tau, count=1000, seed=7)
    assert len(draws) == 1000
    for tau in draws:
        assert all(1 <= t <= max_tau for t in tau)
        o, t_rounds = reference(tau, d, levels, 512, tree, lat, deadline, L, lr, s2, g0, zeta2)
        assert math.isfinite(o) and t_rounds >= 1  # every draw is feasible
        assert r.objective <= o * (1 + 1e-12)
    assert r.beaten_fraction == 1.0 and r.median_gain >= 1.0
    assert r.random_best >= r.objective * (1 - 1e-12)
    assert len(set(draws)) > 20  # the draws are spread out, not one point


def test_N6_max_tau_50_is_fast_and_respects_constraints():
    tree = Tree.uniform([2] * 6)
    lat = LatencyModel(0.01, tuple(1e8 / 4 ** k for k in range(6)), tuple(0.001 * 3 ** k for k in range(6)))
    levels = [16, 8, 8, 4, 4, 0]
    d, L, lr, deadline = 100_000, 1.0, 1e-5, 1e6
    t0 = time.perf_counter()
    r = optimize_tau(d, link_codecs(levels, 512), tree, lat, deadline, L, lr, 50, sigma2=1.0, gap0=10.0, zeta2=0.5,
                     n_random=1000, seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30.0, f"N=6 search took {elapsed:.1f} s"
    assert len(r.tau) == 6 and all(1 <= t <= 50 for t in r.tau)
    obj, T = reference(r.tau, d, levels, 512, tree, lat, deadline, L, lr, 1.0, 10.0, 0.5)
    assert obj == pytest.approx(r.objective, rel=1e-12) and T == r.T >= 1
    assert r.T * r.round_time <= deadline
    assert r.nodes < 50 ** 6 // 100  # far from brute force
    assert r.beaten_fraction == 1.0


def test_random_feasible_is_seeded_and_leaves_global_rng_alone():
    tree = Tree.uniform([2, 2, 2])
    lat = LatencyModel(0.01, (1e8, 1e7, 1e6), (0.001, 0.01, 0.1))
    args = (1000, link_codecs([8, 4, 0], 512), tree, lat, 1e4, 1.0, 1e-3, 20)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a = random_feasible(*args, count=200, seed=5)
    assert np.array_equal(np.random.get_state()[1], state)
    assert a == random_feasible(*args, count=200, seed=5)
    assert a != random_feasible(*args, count=200, seed=6)
    assert random_feasible(*args, count=0, seed=5) == []


def test_optimize_rejects_infeasible_and_bad_input():
    tree = Tree.uniform([2, 2])
    lat = LatencyModel(0.01, (1e8, 1e6), (0.001, 0.1))
    with pytest.raises(ValueError, match="lr=2.0 violates the learning-rate condition even with tau all 1"):
        optimize_tau(100, link_codecs([0, 0], 0), tree, lat, 100.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="deadline=0.05 s is shorter than one global round"):
        optimize_tau(100, link_codecs([0, 0], 0), tree, lat, 0.05, 1.0, 0.01)
    with pytest.raises(ValueError, match="max_tau=0 out of range"):
        optimize_tau(100, link_codecs([0, 0], 0), tree, lat, 100.0, 1.0, 0.01, max_tau=0)
    with pytest.raises(ValueError, match="the tree has N=2 links"):
        optimize_tau(100, link_codecs([0], 0), tree, lat, 100.0, 1.0, 0.01)
    with pytest.raises(ValueError, match="deadline=-1"):
        optimize_tau(100, link_codecs([0, 0], 0), tree, lat, -1, 1.0, 0.01)
    with pytest.raises(ValueError, match="count=-1"):
        random_feasible(100, link_codecs([0, 0], 0), tree, lat, 100.0, 1.0, 0.01, count=-1)
