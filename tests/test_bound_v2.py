"""Bound v2 (core/bound_v2.py, docs/theory.md section 17): its window-local drift lemma measured in a step-by-step
simulation of the hierarchy on least squares (exact without quantization, in expectation with it), the reduction
to the old bound (one layer, full gradients), an admissible step that converges, and the per-layer heterogeneity
coefficients that rank frequent low-layer aggregation first."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qmlhfl_mpi.core.bound_v2 import V2Terms, bound_v2, max_lr_v2, noise_shares, v2_terms
from qmlhfl_mpi.core.codecs import link_codecs
from qmlhfl_mpi.core.theory import convergence_bound_terms, max_lr, q_per_link, tree_constants
from qmlhfl_mpi.core.topology import Tree
from test_theory import aggregate_due, global_loss, least_squares, round_start, run_recursion


def terms_of(tree: Tree, tau, qs) -> V2Terms:
    c = tree_constants(tree)
    return v2_terms(tau, qs, c.alpha, c.beta, noise_shares(tree), c.s2)


def simulate(tree, tau, levels, mu, As, bs, seed):
    """One round, step by step, full gradients, device weights.  Per step: Gamma (spread around the mean), H,
    and per layer n: G_n = sum_u sum_c P_c ||g_c - g_u||^2 (at the devices' models) and zeta_n^2 at the mean."""
    m, d = As[0].shape
    D, N = tree.num_devices, tree.N
    rng, codecs, _, x, node = round_start(tree, levels, d, seed)
    grad = [lambda z, i=i: As[i].T @ (As[i] @ z - bs[i]) / m for i in range(D)]
    K = math.prod(tau)
    out = {"gamma": 0.0, "H": 0.0, "G": np.zeros(N), "zeta2": np.zeros(N)}
    for k in range(K):
        g = np.stack([grad[i](x[i]) for i in range(D)])
        y = x.mean(axis=0)
        gy = np.stack([grad[i](y) for i in range(D)])
        out["gamma"] += np.mean(np.sum((x - y) ** 2, axis=1))
        out["H"] += np.mean(np.sum(g ** 2, axis=1))
        for n in range(1, N + 1):
            for u in range(tree.num_nodes(n)):
                du = tree.device_range(n, u)
                for c in tree.children(n, u):
                    dc = tree.device_range(n - 1, c)
                    P = (dc.stop - dc.start) / D
                    out["G"][n - 1] += P * np.sum((g[dc.start:dc.stop].mean(0) - g[du.start:du.stop].mean(0)) ** 2)
            z = sum((tree.device_range(n - 1, c).stop - tree.device_range(n - 1, c).start) / D * np.sum(
                (gy[tree.device_range(n - 1, c).start:tree.device_range(n - 1, c).stop].mean(0)
                 - gy[tree.device_range(n, u).start:tree.device_range(n, u).stop].mean(0)) ** 2)
                for u in range(tree.num_nodes(n)) for c in tree.children(n, u))
            out["zeta2"][n - 1] = max(out["zeta2"][n - 1], z)  # A3' at the points visited (its sup there)
        x = x - mu * g
        aggregate_due(tree, tau, k, x, node, codecs, rng)
    return out


CASES = [((3, 2), [2, 3]), ((2, 3), [3, 2]), ((2, 2, 2), [[2, 1], [3]]), ((4, 1, 2), [[2, 2], [3]])]


@pytest.mark.parametrize("tau,spec", CASES)
def test_the_window_drift_lemma_holds_exactly_without_quantization(tau, spec):
    """sum_k Gamma^k <= mu^2 sum_n W_n sum_s G_n^s, and with A1 and A3' at the visited points,
    (1 - 2 x^2 sum_n W_n) sum_k Gamma^k <= 2 K mu^2 sum_n W_n zeta_n^2 (full gradients, no quantization: no
    noise part, lambda = 0)."""
    tree = Tree.from_nested(spec)
    As, bs, L = least_squares(tree.num_devices, 8, 15, 3)
    mu = 0.3 / L
    r = simulate(tree, tau, (0,) * len(tau), mu, As, bs, 0)
    t = terms_of(tree, tau, [0.0] * len(tau))
    lemma = mu ** 2 * float(np.dot(t.W, r["G"]))
    assert r["gamma"] <= lemma * (1 + 1e-9)
    assert r["gamma"] > 0.02 * lemma  # and not loose by orders of magnitude here
    mu = 0.7 / (L * math.sqrt(2 * sum(t.W)))  # theta = 0.49
    r = simulate(tree, tau, (0,) * len(tau), mu, As, bs, 0)
    x, K = L * mu, math.prod(tau)
    theta = 2 * x * x * sum(t.W)
    assert (1 - theta) * r["gamma"] <= 2 * K * mu ** 2 * float(np.dot(t.W, r["zeta2"])) * (1 + 1e-9)


@pytest.mark.parametrize("tau,spec,levels", [((2, 3), [3, 2], (2, 0)), ((2, 2, 2), [[2, 1], [3]], (2, 4, 0))])
def test_the_window_drift_lemma_holds_in_expectation_with_quantization(tau, spec, levels):
    """With QSGD below the cloud: E sum_k Gamma^k <= mu^2 [sum_n (1 + lambda) W_n E sum G_n
    + sum_n (1 + 1/lambda) Q_n E sum_s H^s] (lambda = 1, the mean of 24 runs each side)."""
    tree = Tree.from_nested(spec)
    d = 8
    As, bs, L = least_squares(tree.num_devices, d, 15, 4)
    mu = 0.2 / L
    runs = [simulate(tree, tau, levels, mu, As, bs, s) for s in range(24)]
    gamma = np.mean([r["gamma"] for r in runs])
    G = np.mean([r["G"] for r in runs], axis=0)
    H = np.mean([r["H"] for r in runs])
    t = terms_of(tree, tau, q_per_link(d, link_codecs(levels, 0)))
    assert any(t.Q)
    rhs = mu ** 2 * (2 * float(np.dot(t.W, G)) + 2 * sum(t.Q) * H)
    assert gamma <= rhs


def test_one_layer_with_full_gradients_is_the_old_bound():
    """N = 1, no quantization, sigma = 0, heterogeneous: the rate of bound v2 equals the old bound's
    (docs/theory.md section 7) at every step both admit; bound v2 admits more steps."""
    tree = Tree.from_nested(6)
    for tau in (1, 4, 9):
        t = terms_of(tree, (tau,), [0.0])
        for mu in (1e-3, 0.01, 0.03):
            old = convergence_bound_terms(20, mu, 1.0, (tau,), [0.0], tree, 0.0, 2.0, 0.7)
            new = bound_v2(20, mu, 1.0, t, 0.0, 2.0, [0.7])
            if old.condition > 0:
                assert new.admissible and new.total == pytest.approx(old.total, rel=1e-13)
                assert new.drift_layers[0] == pytest.approx(old.drift + old.quant_noise, rel=1e-13)
        # only x < 1 and theta = 2 x^2 W < 1, where the old condition is 1 - x - 3 W x^2 > 0
        v2 = max_lr_v2(1.0, t, 0.0, True)
        assert v2 == pytest.approx(min(1.0, 1 / math.sqrt(2 * t.W[0])) if t.W[0] else 1.0, rel=1e-8)
        assert v2 > max_lr(1.0, (tau,), [0.0], tree) or tau == 1


def test_an_admissible_step_converges_on_least_squares():
    """0.9 times bound v2's largest admissible step, with the exact L, brings the loss gap below 5% in 150
    rounds (with quantization on the device link)."""
    for tau, spec, levels in (((2, 3), [3, 2], (4, 0)), ((2, 2, 2), [[2, 1], [3]], (4, 2, 8))):
        tree = Tree.from_nested(spec)
        d = 10
        As, bs, L = least_squares(tree.num_devices, d, 25, 1)
        t = terms_of(tree, tau, q_per_link(d, link_codecs(levels, 0)))
        mu = 0.9 * max_lr_v2(L, t, 0.0, True)
        losses, _ = run_recursion(tree, list(tau), levels, mu, As, bs, 150, 0)
        fstar = global_loss(np.linalg.lstsq(np.vstack(As), np.concatenate(bs), rcond=None)[0], As, bs)
        assert np.all(np.isfinite(losses)) and losses[-1] - fstar < 0.05 * (losses[0] - fstar)


def test_per_layer_coefficients_rank_frequent_edge_aggregation_first():
    """K = 32, N = 2, no quantization, full gradients, zeta_1^2 = 1, zeta_2^2 = 1: the window coefficient of the
    devices' spread inside an edge is W_1 = tau_1 (tau_1 - 1)/2 (the old bound charged about K tau_1), so the bound
    orders the splits by tau_1; lambda is chosen for the whole bound and the term shares add up to 1."""
    tree = Tree.from_nested([8, 8, 8, 8])
    totals = []
    for t1 in (1, 2, 4, 8, 16, 32):
        t = terms_of(tree, (t1, 32 // t1), [0.0, 0.0])
        assert t.W == (t1 * (t1 - 1) / 2, 32 * 31 / 2)
        b = bound_v2(50, 1e-3, 1.0, t, 0.5, 1.0, [1.0, 1.0])
        assert b.admissible and sum(b.shares().values()) == pytest.approx(1.0)
        totals.append(b.total)
    assert totals == sorted(totals)
    t = terms_of(tree, (4, 8), [0.5, 0.0])
    assert all(lam > 0 for lam in bound_v2(50, 1e-3, 1.0, t, 0.5, 1.0, [1.0, 1.0]).lam)
