"""Per-layer heterogeneity bound (core/theory.py, docs/theory.md section 15).

Pure formulas (no training), except the last test which runs ``check`` on a
small synthetic config in a subprocess.
"""
from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys

import pytest

from helpers import REPO, small_config
from qmlhfl_mpi.core.codecs import link_codecs
from qmlhfl_mpi.core.optimize import optimize_tau
from qmlhfl_mpi.core.theory import (
    LatencyModel,
    condition_terms,
    convergence_bound,
    convergence_bound_layers,
    convergence_bound_layers_terms,
    layer_condition_terms,
    layer_drift_coefficients,
    lr_condition_B,
    q_per_link,
    round_time,
    tree_constants,
)
from qmlhfl_mpi.core.topology import Tree

TREES = {1: Tree.uniform([6]), 2: Tree.uniform([3, 2]), 3: Tree.uniform([2, 2, 3]), 4: Tree.uniform([2, 2, 2, 2])}
TAUS = {1: [(1,), (3,), (7,)], 2: [(1, 1), (2, 3), (5, 1), (1, 6)],
        3: [(1, 1, 1), (2, 3, 2), (4, 1, 3)], 4: [(1, 1, 1, 1), (2, 2, 2, 2), (3, 1, 2, 2)]}
# split study (docs/theory.md section 15): 4 edges x 8 devices, no quantization, edge-level heterogeneity
SPLIT_TREE = Tree.uniform([4, 8])
SPLIT = {"T": 100, "mu": 0.01, "L": 1.0, "sigma2": 1.0, "gap0": 1.0}
ZETA_EDGE = (0.1, 10.0)            # zeta_1^2 small (devices of one edge similar), zeta_2^2 large (edges differ)
SPLITS_2 = [(32, 1), (16, 2), (8, 4), (4, 8), (2, 16), (1, 32)]
SPLIT_TREE_3 = Tree.uniform([2, 4, 4])  # 2 regions x 4 edges x 4 devices
ZETA_EDGE_3 = (0.1, 10.0, 10.0)
SPLITS_3 = [(8, 4, 1), (4, 2, 4), (2, 4, 4), (1, 1, 32)]


def _split_bound(tau, zeta, tree=SPLIT_TREE):
    s = SPLIT
    return convergence_bound_layers(s["T"], s["mu"], s["L"], tau, [0.0] * len(tau), tree, s["sigma2"], s["gap0"],
                                    zeta)


@pytest.mark.parametrize("N", [1, 2, 3, 4])
@pytest.mark.parametrize("iid", [False, True])
def test_reduces_to_the_old_bound_without_quantization(N, iid):
    # all heterogeneity at the top layer (the old single constant's worst case) and q = 0
    tree = TREES[N]
    for tau in TAUS[N]:
        q = [0.0] * N
        zeta = 0.0 if iid else 0.7
        zl = [0.0] * (N - 1) + [zeta]
        mu = 0.5 / (2.0 * math.sqrt(lr_condition_B(tau, q, tree, iid=iid)))
        old = convergence_bound(7, mu, 2.0, tau, q, tree, 1.3, 2.5, zeta, iid=iid)
        new = convergence_bound_layers(7, mu, 2.0, tau, q, tree, 1.3, 2.5, zl, iid=iid)
        assert math.isfinite(old) and new == pytest.approx(old, rel=1e-13, abs=0.0)
        assert layer_condition_terms(tau, q, tree, iid=iid).B == pytest.approx(
            condition_terms(tau, q, tree, iid=iid).B, rel=1e-13)


@pytest.mark.parametrize("N", [1, 2, 3, 4])
def test_per_layer_split_never_exceeds_the_old_bound_without_quantization(N):
    # sum_n zeta_n^2 = the old zeta^2 (law of total variance); c_n <= K(K-1)/2
    tree = TREES[N]
    zl = [0.3 * (n + 1) for n in range(N)]
    for tau in TAUS[N]:
        q = [0.0] * N
        K = math.prod(tau)
        assert all(c <= K * (K - 1) / 2 for c in layer_drift_coefficients(tau, q, tree))
        mu = 0.2 / (2.0 * math.sqrt(lr_condition_B(tau, q, tree)))
        assert (convergence_bound_layers(5, mu, 2.0, tau, q, tree, 1.0, 1.0, zl)
                <= convergence_bound(5, mu, 2.0, tau, q, tree, 1.0, 1.0, sum(zl)) * (1 + 1e-13))


def test_all_layers_equal_counts_the_heterogeneity_per_layer():
    # zeta_n^2 are between-children divergences: equal zeta_n add up (N of them), they are not one
    # constant repeated.  For N = 1 the per-layer bound IS the old one.
    tree = TREES[1]
    mu = 0.01
    assert convergence_bound_layers(5, mu, 1.0, (4,), [0.0], tree, 1.0, 1.0, [0.5]) == pytest.approx(
        convergence_bound(5, mu, 1.0, (4,), [0.0], tree, 1.0, 1.0, 0.5), rel=1e-13)


def test_layer_coefficients_by_hand():
    # c_n = (T_n - 1)(2K - T_n)/2 without quantization
    assert layer_drift_coefficients((4, 8), [0.0, 0.0], SPLIT_TREE) == (3 * 60 / 2, 31 * 32 / 2)
    assert layer_drift_coefficients((2, 3, 4), [0.0] * 3, TREES[3]) == (1 * 46 / 2, 5 * 42 / 2, 23 * 24 / 2)


def _Q(tau, qs, tree):
    return layer_condition_terms(tau, qs, tree).Q


def test_quantization_drift_is_linear_in_tau_n_for_n_at_least_2():
    tree = TREES[2]
    c = tree_constants(tree)
    qs = [1.5, 0.8]
    for t1 in (1, 3, 5):
        vals = [_Q((t1, t2), qs, tree) for t2 in range(1, 9)]
        # Q = q_1 alpha_1 tau_1^2 (tau_2 - 1): affine in tau_2 (the paper's q_1 tau_2 tau_1^2)
        assert vals == pytest.approx([qs[0] * c.alpha[0] * t1 * t1 * (t2 - 1) for t2 in range(1, 9)], rel=1e-13)
        # doubling tau_2 - 1 doubles it (3 -> 5); doubling tau_2 (4 -> 8) multiplies it by
        # (2 tau_2 - 1)/(tau_2 - 1) = 7/3, tending to 2 -- not the x4 of a quadratic term
        assert vals[4] == pytest.approx(2 * vals[2], rel=1e-13)
        assert vals[7] / vals[3] == pytest.approx(7 / 3, rel=1e-13)
        # the old quantization drift is quadratic in tau_2
        old = [sum(condition_terms((t1, t2), qs, tree).quant_drift) for t2 in (2, 4, 8)]
        if t1 > 1:
            assert old[2] / old[1] > 3.5
    # N = 3: link 1's term is affine in tau_2 and in tau_3 (q_2 = q_3 = 0)
    tree3 = TREES[3]
    q3 = [1.0, 0.0, 0.0]
    for tau in [(2, 1, 3), (3, 2, 1)]:
        for n in (1, 2):
            seq = [_Q(tuple(t if i != n else v for i, t in enumerate(tau)), q3, tree3) for v in (1, 2, 3, 4)]
            second = [seq[i + 2] - 2 * seq[i + 1] + seq[i] for i in range(2)]
            assert second == pytest.approx([0.0, 0.0], abs=1e-9)
    # no quantization: no quantization terms at all
    t = layer_condition_terms((3, 4), [0.0, 0.0], tree)
    assert t.Q == 0.0 and t.C_eps == 0.0 and t.B_gamma == 12 * 11 / 2


def test_bound_terms_split_and_quantization_noise_term_in_the_bound():
    tree = TREES[2]
    qs = [1.5, 0.8]
    mu = 0.002
    b = convergence_bound_layers_terms(10, mu, 1.0, (3, 4), qs, tree, 1.0, 1.0, [0.2, 0.5])
    t = layer_condition_terms((3, 4), qs, tree)
    x = mu
    f = x * x * (1 + 2 * x * t.C_eps) / (1 - 2 * x * x * t.B_gamma)
    assert b.drift_sigma == pytest.approx(f * t.B_gamma)
    assert b.drift_layers == pytest.approx(tuple(f * 2 * cn * z for cn, z in zip(t.coefficients, [0.2, 0.5])))
    assert b.quant_noise == pytest.approx(x * t.C_eps * (1 + 2 * 0.7))
    assert b.total == pytest.approx(b.optimisation + b.sampling + b.quant_noise + b.drift)
    # lambda = sqrt(Q/K0) gives B_Gamma' = (1 + lambda) K0 + (1 + 1/lambda) Q
    lam = t.lam
    assert t.B_gamma == pytest.approx((1 + lam) * t.K0 + (1 + 1 / lam) * t.Q)


def test_split_study_N2_prefers_frequent_edge_aggregation():
    b = {tau: _split_bound(tau, ZETA_EDGE) for tau in SPLITS_2}
    assert b[(4, 8)] < b[(32, 1)]
    # hand-derived: the splits differ only in c_1 zeta_1^2 with c_1 = (tau_1 - 1)(64 - tau_1)/2 =
    # 496, 360, 196, 90, 31, 0 for tau_1 = 32, 16, 8, 4, 2, 1 (c_2 = 496 for all): ordered by tau_1
    expected = [(1, 32), (2, 16), (4, 8), (8, 4), (16, 2), (32, 1)]
    assert sorted(SPLITS_2, key=lambda t: b[t]) == expected
    f = SPLIT["mu"] ** 2 / (1 - 2 * SPLIT["mu"] ** 2 * 496)
    for tau in SPLITS_2:
        c1 = (tau[0] - 1) * (64 - tau[0]) / 2
        assert b[tau] - b[(1, 32)] == pytest.approx(f * 2 * c1 * ZETA_EDGE[0], rel=1e-9)
    # zeta_2 = zeta_1: the same ordering (the formula never favours rare edge aggregation);
    # zeta_1 = 0: no preference at all (every split of K = 32 has the same bound)
    eq = {tau: _split_bound(tau, (1.0, 1.0)) for tau in SPLITS_2}
    assert sorted(SPLITS_2, key=lambda t: eq[t]) == expected
    flat = {_split_bound(tau, (0.0, 10.0)) for tau in SPLITS_2}
    assert max(flat) - min(flat) <= 1e-12 * max(flat)


def test_split_study_N3_orders_by_the_layer2_period():
    b = {tau: _split_bound(tau, ZETA_EDGE_3, SPLIT_TREE_3) for tau in SPLITS_3}
    # hand-derived: 0.1 c_1 + 10 c_2 with c(T) = (T - 1)(64 - T)/2: (1,1,32) 0, (2,4,4) 3.1 + 1960,
    # (4,2,4) 9 + 1960, (8,4,1) 19.6 + 4960
    assert sorted(SPLITS_3, key=lambda t: b[t]) == [(1, 1, 32), (2, 4, 4), (4, 2, 4), (8, 4, 1)]


def _reference_layers(tau, d, levels, tree, lat, deadline, L, lr, s2, g0, zl):
    codecs = link_codecs(levels, 512)
    T = math.floor(deadline / round_time(d, tau, codecs, tree, lat))
    qs = q_per_link(d, codecs)
    if T < 1:
        return math.inf
    return convergence_bound_layers(T, lr, L, tau, qs, tree, s2, g0, zl)


@pytest.mark.parametrize("spec,levels,max_tau,lr,zl", [
    ([3, 2], [8, 2], 12, 1e-3, (0.2, 1.0)),
    ([2, 3], [0, 0], 12, 2e-3, (0.05, 3.0)),
    ([2, 2, 2], [16, 8, 4], 6, 1e-3, (0.1, 2.0, 0.5)),
])
def test_optimize_with_layers_matches_exhaustive_search(spec, levels, max_tau, lr, zl):
    tree = Tree.uniform(spec)
    N = tree.N
    lat = LatencyModel(0.01, tuple([1e7] * N), tuple([0.01 * (n + 1) for n in range(N)]))
    d, L, s2, g0, deadline = 5000, 2.0, 0.5, 3.0, 200.0
    r = optimize_tau(d, link_codecs(levels, 512), tree, lat, deadline, L, lr, max_tau, sigma2=s2, gap0=g0,
                     n_random=10, zeta2_layers=zl)
    best = min(_reference_layers(t, d, levels, tree, lat, deadline, L, lr, s2, g0, zl)
               for t in itertools.product(range(1, max_tau + 1), repeat=N))
    assert math.isfinite(best) and r.objective == pytest.approx(best, rel=1e-12)
    qs = q_per_link(d, link_codecs(levels, 512))
    assert r.B == pytest.approx(layer_condition_terms(r.tau, qs, tree).B)


def test_optimize_layers_equals_single_zeta_without_quantization():
    tree = Tree.uniform([3, 2])
    lat = LatencyModel(0.01, (1e7, 1e6), (0.01, 0.1))
    args = (5000, link_codecs([0, 0], 512), tree, lat, 300.0, 2.0, 1e-3, 15)
    a = optimize_tau(*args, sigma2=0.5, gap0=3.0, zeta2=0.8, n_random=5)
    b = optimize_tau(*args, sigma2=0.5, gap0=3.0, zeta2_layers=(0.0, 0.8), n_random=5)
    assert a.tau == b.tau and a.objective == pytest.approx(b.objective, rel=1e-12)
    with pytest.raises(ValueError, match="give one of them"):
        optimize_tau(*args, zeta2=0.8, zeta2_layers=(0.0, 0.8))
    with pytest.raises(ValueError, match="N=2"):
        optimize_tau(*args, zeta2_layers=(0.8,))


def test_check_prints_zeta_estimates(tmp_path):
    cfg = small_config(tmp_path)
    out = subprocess.run([sys.executable, "-m", "qmlhfl_mpi", "check", str(cfg), "--L", "1.0"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    m = re.search(r"zeta_n\^2 = ([0-9.e+-]+), ([0-9.e+-]+) \(ESTIMATE", out.stdout)
    assert m, out.stdout
    assert all(float(v) >= 0 for v in m.groups())
    shares = re.search(r"share of the heterogeneity drift .*: layer 1 ([0-9.]+)%, layer 2 ([0-9.]+)%", out.stdout)
    assert shares, out.stdout
    assert sum(float(v) for v in shares.groups()) == pytest.approx(100.0, abs=0.2)


def test_docs_state_the_computed_split_orderings():
    text = " ".join((REPO / "docs" / "theory.md").read_text(encoding="utf-8").split())
    b2 = {tau: _split_bound(tau, ZETA_EDGE) for tau in SPLITS_2}
    order2 = sorted(SPLITS_2, key=lambda t: b2[t])
    assert f"**{order2[0]} first, then " + ", ".join(map(str, order2[1:])) + "**" in text
    b3 = {tau: _split_bound(tau, ZETA_EDGE_3, SPLIT_TREE_3) for tau in SPLITS_3}
    order3 = sorted(SPLITS_3, key=lambda t: b3[t])
    assert "**" + " < ".join(f"{tau} {b3[tau]:.5f}" for tau in order3) + "**" in text
