"""core/theory.py: quantizer factors, learning-rate condition, bound, latency model.

Expected values are worked out by hand in the tests (literals and explicit
arithmetic), never by calling the code under test.  The last tests check the
bound's key lemma and the learning-rate condition on a simulated least-squares
problem run through the nested recursion with quantized differences.
"""
import math
import subprocess
import sys

import numpy as np
import pytest

from qmlhfl_mpi.core.codecs import link_codecs, make_codec
from qmlhfl_mpi.core.codecs.qsgd import QSGDCodec
from qmlhfl_mpi.core.theory import (
    LatencyModel,
    TreeConstants,
    condition_terms,
    convergence_bound,
    convergence_bound_terms,
    error_factor,
    lr_condition,
    lr_condition_B,
    max_lr,
    message_bits,
    q_per_link,
    round_time,
    round_time_parts,
    tree_constants,
)
from qmlhfl_mpi.core.topology import Tree


def b_from(A, kappa_bgamma):
    """B with 1 - L^2 mu^2 B > 0  <=>  1 - A (L mu) - kappa B_Gamma (L mu)^2 > 0."""
    return ((A + math.sqrt(A * A + 4 * kappa_bgamma)) / 2) ** 2


# ---- quantizer factors -----------------------------------------------------------
def test_q_per_link_hand_values():
    # bucket 0: B = d = 1000; s=4: min(1000/16, sqrt(1000)/4); s=16: min(1000/256, sqrt(1000)/16)
    assert q_per_link(1000, link_codecs([0, 4, 16], 0)) == pytest.approx([0.0, 7.905694150420948, 1.976423537605237])
    # bucket 512: B = 512; s=4: min(512/16=32, sqrt(512)/4)
    assert q_per_link(1000, link_codecs([4], 512)) == pytest.approx([5.656854249492381])
    # bucket longer than the vector: B = d; s=100: min(10/10000, sqrt(10)/100) = 0.001
    assert q_per_link(10, link_codecs([100], 512)) == pytest.approx([0.001])


def test_error_factor():
    assert error_factor([0.5, 0.25, 0.0]) == pytest.approx(1.5 * 1.25)
    assert error_factor([]) == 1.0
    with pytest.raises(ValueError, match="qs\\[1\\]=-0.1"):
        error_factor([0.1, -0.1])


@pytest.mark.parametrize("d,s,bucket", [(64, 1, 0), (64, 4, 0), (300, 2, 16), (1000, 16, 0), (1000, 8, 128),
                                        (513, 3, 100)])
@pytest.mark.parametrize("kind", ["gauss", "spiky"])
def test_quantizer_variance_bound_holds_empirically(d, s, bucket, kind):
    rng = np.random.default_rng(d * 31 + s)
    x = rng.standard_normal(d).astype(np.float32)
    if kind == "spiky":
        x = (x * (rng.random(d) < 0.05)).astype(np.float32)
        x[0] = 5.0
    codec = QSGDCodec(s, bucket)
    errs = [np.sum((codec.decode(codec.encode_vector(x, np.random.default_rng(i)), d).astype(np.float64) - x) ** 2)
            for i in range(300)]
    (q,) = q_per_link(d, link_codecs([s], bucket))
    assert np.mean(errs) <= q * float(np.sum(x.astype(np.float64) ** 2))


def test_q_per_link_rejects_bad_input():
    # the model dimension is checked by q_per_link; levels and bucket where the codecs are built
    with pytest.raises(ValueError, match="d=0"):
        q_per_link(0, link_codecs([4], 0))
    with pytest.raises(ValueError, match="codecs=\\[\\] is empty"):
        q_per_link(10, [])
    with pytest.raises(ValueError, match=r"levels=-1, bucket=0: levels s=-1 out of range: expected an integer 1 <= s <= 32767"):
        link_codecs([4, -1], 0)
    with pytest.raises(ValueError, match=r"levels=-1, bucket=0: levels s=-1 out of range"):
        make_codec(-1, 0)
    with pytest.raises(ValueError, match=r"levels s=-1 out of range: expected an integer 1 <= s <= 32767"):
        QSGDCodec(-1, 0)
    with pytest.raises(ValueError, match=r"levels s=32768 out of range: expected an integer 1 <= s <= 32767"):
        link_codecs([4, 32768], 0)
    with pytest.raises(ValueError, match="bucket=-3"):
        link_codecs([4], -3)
    with pytest.raises(ValueError, match="bucket=-3"):
        QSGDCodec(4, -3)


# ---- tree constants ---------------------------------------------------------------
def test_tree_constants_balanced_unbalanced_and_samples():
    c = tree_constants(Tree.uniform([2, 3]))  # 2 edges x 3 devices, D = 6
    assert c.alpha == pytest.approx((1 / 3, 1 / 2)) and c.beta == pytest.approx((1 / 6, 1 / 2))
    assert c.s2 == pytest.approx(6 / 36)
    c = tree_constants(Tree.from_nested([3, 1]))  # the lone device is its edge's only child
    assert c.alpha == pytest.approx((1.0, 3 / 4)) and c.beta == pytest.approx((1 / 4, 3 / 4))
    assert c.s2 == pytest.approx(4 / 16)
    c = tree_constants(Tree.from_nested([3, 1]), samples=np.array([1, 1, 2, 4]))  # S = 8, edges 4 | 4
    assert c.alpha == pytest.approx((1.0, 0.5)) and c.beta == pytest.approx((0.5, 0.5))
    assert c.s2 == pytest.approx((1 + 1 + 4 + 16) / 64)
    c = tree_constants(Tree.from_nested(5))  # FedAvg, N = 1
    assert c.alpha == pytest.approx((0.2,)) and c.beta == pytest.approx((0.2,)) and c.s2 == pytest.approx(0.2)


# ---- learning-rate condition -------------------------------------------------------
def test_condition_N1_hand():
    tree = Tree.from_nested(4)  # alpha = beta = 1/4
    t = condition_terms([5], [0.5], tree)
    assert t.visible == 10 and t.cross == 0 and t.quant_drift == ()
    assert t.quant_noise == pytest.approx((0.5 * 0.25 * 5,))
    assert t.B_gamma == 10 and t.C_eps == pytest.approx(0.625)
    assert lr_condition_B([5], [0.5], tree) == pytest.approx(b_from(1.625, 3 * 10))
    assert lr_condition_B([5], [0.5], tree, iid=True) == pytest.approx(b_from(1.625, 10))
    # no quantization, IID: 1 - L mu - L^2 mu^2 tau(tau-1)/2 > 0 (local SGD)
    assert lr_condition_B([5], [0.0], tree, iid=True) == pytest.approx(b_from(1.0, 10))
    # tau = 1, no quantization: plain SGD, condition L mu < 1
    assert lr_condition_B([1], [0.0], tree, iid=True) == pytest.approx(1.0)


def test_condition_N2_hand():
    tree = Tree.from_nested([3, 2])  # alpha = (1/2, 3/5), beta = (1/5, 3/5)
    t = condition_terms([2, 3], [0.5, 0.25], tree)
    # T = 1, 2, 6; visible = 2*1/2 + (3*2/2)*2^2 = 13; cross = (2-1)(6-2)/2 = 2
    assert t.visible == 13 and t.cross == 2
    # Pi_1 = 1 + 0.5*0.5; S_1 = (6*5 - 2*1)/2 = 14
    assert t.quant_drift == pytest.approx((0.25 * 14,))
    assert t.quant_noise == pytest.approx((0.5 * 0.2 * 2 * 1, 0.25 * 0.6 * 6 * 1.25))
    assert t.B_gamma == pytest.approx(18.5) and t.C_eps == pytest.approx(1.325)
    assert lr_condition_B([2, 3], [0.5, 0.25], tree) == pytest.approx(b_from(2.325, 3 * 18.5))


def test_condition_N3_hand():
    tree = Tree.uniform([2, 2, 2])  # D = 8; alpha = 1/2 everywhere; beta = 1/8, 1/4, 1/2
    t = condition_terms([2, 2, 3], [1.0, 0.5, 0.25], tree)
    # T = 1, 2, 4, 12; visible = 1 + (2*1/2)*2^2 + (3*2/2)*4^2 = 53
    assert t.visible == 53
    # cross = (2-1)(4-2)/2 + (4-1)(12-4)/2 = 13; visible + cross = K(K-1)/2 = 66
    assert t.cross == 13
    # Pi_1 = 1.5, Pi_2 = 1.5*1.25 = 1.875; S_1 = (4*3 - 2*1)/2 = 5; S_2 = (12*11 - 4*3)/2 = 60
    assert t.quant_drift == pytest.approx((0.5 * 5, 0.875 * 60))
    assert t.quant_noise == pytest.approx((1.0 / 8 * 2, 0.5 / 4 * 4 * 1.5, 0.25 / 2 * 12 * 1.875))
    assert t.B_gamma == pytest.approx(121) and t.C_eps == pytest.approx(3.8125)
    assert lr_condition_B([2, 2, 3], [1.0, 0.5, 0.25], tree) == pytest.approx(b_from(4.8125, 363))


def test_condition_unbalanced_hand():
    tree = Tree.from_nested([3, 1])  # alpha = (1, 3/4), beta = (1/4, 3/4)
    t = condition_terms([2, 2], [1.0, 0.5], tree)
    # T = 1, 2, 4; Pi_1 = 1 + 1*1 = 2 (the lone device is not averaged with anyone)
    assert (t.visible, t.cross) == (5, 1)
    assert t.quant_drift == pytest.approx((1.0 * 5,))
    assert t.quant_noise == pytest.approx((1.0 * 0.25 * 2, 0.5 * 0.75 * 4 * 2))
    balanced = condition_terms([2, 2], [1.0, 0.5], Tree.uniform([2, 2]))
    assert balanced.quant_drift == pytest.approx((0.5 * 5,))  # Pi_1 = 1.5
    assert t.B > balanced.B


@pytest.mark.parametrize("tau", [[1], [7], [3, 4], [1, 5], [2, 3, 4], [5, 1, 2], [2, 2, 2, 2, 2, 3]])
def test_visible_plus_cross_is_K_K_minus_1_over_2(tau):
    K = math.prod(tau)
    tree = Tree.uniform([2] * len(tau))
    t = condition_terms(tau, [0.0] * len(tau), tree)
    assert t.visible + t.cross == K * (K - 1) / 2 == t.B_gamma
    # the paper's visible terms, written out
    T = [math.prod(tau[:m]) for m in range(len(tau) + 1)]
    vis = tau[0] * (tau[0] - 1) / 2 + sum(tau[n - 1] * (tau[n - 1] - 1) / 2 * T[n - 1] ** 2
                                          for n in range(2, len(tau) + 1))
    assert t.visible == vis


def test_B_grows_with_every_tau_and_q():
    tree = Tree.uniform([2, 3, 2])
    base = lr_condition_B([2, 2, 2], [0.5, 0.5, 0.5], tree)
    for n in range(3):
        tau = [2, 2, 2]
        tau[n] = 3
        assert lr_condition_B(tau, [0.5, 0.5, 0.5], tree) > base
        qs = [0.5, 0.5, 0.5]
        qs[n] = 0.6
        assert lr_condition_B([2, 2, 2], qs, tree) > base


@pytest.mark.parametrize("tau,qs,spec", [([4], [0.3], 6), ([3, 2], [1.2, 0.0], [2, 5]),
                                         ([2, 3, 2], [0.5, 1.0, 2.0], [[3, 1], [2]])])
def test_max_lr_is_on_the_boundary(tau, qs, spec):
    tree = Tree.from_nested(spec)
    L = 3.7
    mu = max_lr(L, tau, qs, tree)
    assert lr_condition(mu * (1 - 1e-9), L, tau, qs, tree) > 0
    assert lr_condition(mu * (1 + 1e-9), L, tau, qs, tree) < 0
    assert abs(lr_condition(mu, L, tau, qs, tree)) < 1e-12
    t = condition_terms(tau, qs, tree)  # the unexpanded condition is zero there too
    x = L * mu
    assert 1 - t.A * x - 3 * t.B_gamma * x * x == pytest.approx(0.0, abs=1e-12)
    assert convergence_bound(5, mu * 0.999, L, tau, qs, tree, 1.0, 1.0) < math.inf
    assert convergence_bound(5, mu * 1.001, L, tau, qs, tree, 1.0, 1.0) == math.inf


def test_condition_rejects_bad_input():
    tree = Tree.uniform([2, 2])
    with pytest.raises(ValueError, match=r"tau=\[2\] has 1 entries: the tree has N=2"):
        lr_condition_B([2], [0.1, 0.1], tree)
    with pytest.raises(ValueError, match=r"tau\[1\]=0 out of range"):
        lr_condition_B([2, 0], [0.1, 0.1], tree)
    with pytest.raises(ValueError, match="L=0.0"):
        max_lr(0.0, [2, 2], [0.1, 0.1], tree)


# ---- convergence bound ------------------------------------------------------------
def test_bound_N1_hand():
    tree = Tree.from_nested(4)
    # B_Gamma = 10, C_eps = 0.625, S2 = 1/4; x = L mu = 0.01
    T, mu, L, s2, g0, z2 = 10, 0.01, 1.0, 2.0, 3.0, 0.5
    n2 = 2.0 + 2 * 0.5
    expect = (2 * 3.0 / (0.01 * 10 * 5) + 0.01 * 2.0 * 0.25 + 0.01 * 0.625 * n2
              + 0.01 ** 2 * 10 * (1 + 2 * 0.01 * 0.625) / (1 - 2 * 0.01 ** 2 * 10) * n2)
    assert convergence_bound(T, mu, L, [5], [0.5], tree, s2, g0, z2) == pytest.approx(expect, rel=1e-12)
    expect_iid = 2 * 3.0 / (0.01 * 10 * 5) + 0.01 * 2.0 * 0.25 + 0.01 * 0.625 * 2.0 + 0.01 ** 2 * 10 * 2.0
    assert convergence_bound(T, mu, L, [5], [0.5], tree, s2, g0, iid=True) == pytest.approx(expect_iid)


def test_bound_N2_hand():
    tree = Tree.from_nested([3, 2])  # B_Gamma = 18.5, C_eps = 1.325, S2 = 1/5, K = 6
    T, mu, L = 7, 0.002, 2.0
    x = 0.004
    expect = (2 * 1.5 / (0.002 * 7 * 6) + x * 1.0 * 0.2 + x * 1.325 * 1.0
              + x * x * 18.5 * (1 + 2 * x * 1.325) / (1 - 2 * x * x * 18.5) * 1.0)
    got = convergence_bound(T, mu, L, [2, 3], [0.5, 0.25], tree, sigma2=1.0, gap0=1.5)
    assert got == pytest.approx(expect, rel=1e-12)


def test_bound_N3_hand_and_terms():
    tree = Tree.uniform([2, 2, 2])  # B_Gamma = 121, C_eps = 3.8125, S2 = 1/8, K = 12
    T, mu, L, z2 = 3, 0.001, 5.0, 0.25
    x = 0.005
    n2 = 0.5 + 2 * 0.25
    terms = convergence_bound_terms(T, mu, L, [2, 2, 3], [1.0, 0.5, 0.25], tree, 0.5, 2.0, z2)
    assert terms.optimisation == pytest.approx(2 * 2.0 / (0.001 * 3 * 12))
    assert terms.sampling == pytest.approx(x * 0.5 / 8)
    assert terms.quant_noise == pytest.approx(x * 3.8125 * n2)
    assert terms.drift == pytest.approx(x * x * 121 * (1 + 2 * x * 3.8125) / (1 - 2 * x * x * 121) * n2)
    assert terms.total == pytest.approx(terms.optimisation + terms.sampling + terms.quant_noise + terms.drift)


def test_bound_leading_term_and_compounding():
    tree = Tree.uniform([2, 2])
    args = dict(L=1.0, tau=[3, 2], tree=tree, sigma2=0.0, gap0=1.0)
    # no noise: the bound is exactly 2 gap0 / (mu T prod(tau))
    assert convergence_bound(T=10, mu=0.01, qs=[0.0, 0.0], **args) == pytest.approx(2 / (0.01 * 10 * 6))
    b = [convergence_bound(T=t, mu=0.01, qs=[0.5, 0.5], **{**args, "sigma2": 1.0}) for t in (1, 10, 100, 1000)]
    assert all(u > v for u, v in zip(b, b[1:]))
    # stronger quantization on any link only makes things worse
    q_lo = convergence_bound(T=50, mu=0.01, qs=[0.5, 0.5], **{**args, "sigma2": 1.0})
    assert convergence_bound(T=50, mu=0.01, qs=[1.0, 0.5], **{**args, "sigma2": 1.0}) > q_lo
    assert convergence_bound(T=50, mu=0.01, qs=[0.5, 1.0], **{**args, "sigma2": 1.0}) > q_lo


def test_bound_rejects_bad_input():
    tree = Tree.uniform([2])
    with pytest.raises(ValueError, match="T=0"):
        convergence_bound(0, 0.01, 1.0, [2], [0.0], tree, 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma2=-1.0"):
        convergence_bound(1, 0.01, 1.0, [2], [0.0], tree, -1.0, 1.0)
    with pytest.raises(ValueError, match="zeta2=0.5 with iid=True"):
        convergence_bound(1, 0.01, 1.0, [2], [0.0], tree, 1.0, 1.0, 0.5, iid=True)


def test_tree_constants_can_be_passed_instead_of_tree():
    tree = Tree.from_nested([[3, 1], [2]])
    c = tree_constants(tree)
    assert isinstance(c, TreeConstants) and c.N == 3
    assert lr_condition_B([2, 2, 2], [0.1, 0.2, 0.3], c) == lr_condition_B([2, 2, 2], [0.1, 0.2, 0.3], tree)


# ---- latency model ---------------------------------------------------------------
def test_round_time_hand_N1_N2_N3():
    lat1 = LatencyModel(0.02, (1e6,), (0.005,))
    # d=1000, s=2, bucket 0: 4 + ceil(1000*3/8) = 379 bytes = 3032 bits
    assert message_bits(1000, link_codecs([2], 0)) == [3032]
    assert round_time(1000, [4], link_codecs([2], 0), Tree.from_nested(3), lat1) == pytest.approx(
        4 * 0.02 + 3032 / 1e6 + 0.005)

    lat2 = LatencyModel(0.01, (1e6, 1e5), (0.001, 0.05))
    # link 1: s=8, bucket 512: 2 norms + ceil(1000*5/8) = 8 + 625 = 633 bytes; link 2: float32 4000 bytes
    parts = round_time_parts(1000, [3, 4], link_codecs([8, 0], 512), Tree.uniform([2, 2]), lat2)
    assert parts.compute == pytest.approx(12 * 0.01)
    assert parts.comm == pytest.approx((4 * (633 * 8 / 1e6 + 0.001), 1 * (32000 / 1e5 + 0.05)))
    assert parts.total == pytest.approx(0.12 + 0.024256 + 0.37)

    lat3 = LatencyModel(0.001, (1e7, 1e6, 1e5), (0.0, 0.01, 0.1))
    # s=16, bucket 100: 10 norms + ceil(1000*6/8) = 40 + 750 = 790 bytes on every link
    got = round_time_parts(1000, [2, 3, 4], link_codecs([16, 16, 16], 100), Tree.uniform([2, 2, 2]),
                           lat3)
    assert got.compute == pytest.approx(24 * 0.001)
    assert got.comm == pytest.approx((12 * 6320 / 1e7, 4 * (6320 / 1e6 + 0.01), 1 * (6320 / 1e5 + 0.1)))


def test_latency_model_validation():
    with pytest.raises(ValueError, match=r"uplink_rate\[1\]=0.0"):
        LatencyModel(0.01, (1e6, 0.0), (0.0, 0.0))
    with pytest.raises(ValueError, match="same number"):
        LatencyModel(0.01, (1e6,), (0.0, 0.0))
    with pytest.raises(ValueError, match="step_time=-1.0"):
        LatencyModel(-1.0, (1e6,), (0.0,))
    with pytest.raises(ValueError, match="N=2 links"):
        round_time(10, [2, 2], link_codecs([0], 0), Tree.uniform([2, 2]), LatencyModel(0.0, (1.0, 1.0), (0.0, 0.0)))
    lat = LatencyModel(0, [5, 6], [1, 2])  # lists and ints are normalised to float tuples
    assert lat.uplink_rate == (5.0, 6.0) and isinstance(lat.step_time, float)


def test_theory_and_optimize_are_pure():
    code = ("import sys, qmlhfl_mpi.core.theory, qmlhfl_mpi.core.optimize, qmlhfl_mpi.core.codecs; "
            "bad = [m for m in ('torch', 'mpi4py', 'h5py') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- numerical sanity: the nested recursion on least squares ------------------------
def least_squares(D, d, m, seed):
    """Devices with the same feature distribution, different targets (non-IID)."""
    rng = np.random.default_rng(seed)
    As = [rng.standard_normal((m, d)) for _ in range(D)]
    bs = [A @ rng.standard_normal(d) + rng.standard_normal(m) for A in As]
    L = max(np.linalg.eigvalsh(A.T @ A / m).max() for A in As)  # every f_i is L-smooth
    return As, bs, L


def global_loss(w, As, bs):
    return float(np.mean([0.5 * np.mean((A @ w - b) ** 2) for A, b in zip(As, bs)]))


def run_recursion(tree, tau, levels, mu, As, bs, rounds, seed, w0=None):
    """docs/algorithm.md section 3 literally: aggregate(u, v) = v + sum_c a(c) Q_n(work(c, v) - v).
    Returns the global loss after each round and the final model."""
    m, d = As[0].shape
    codecs = [make_codec(s, 0) for s in levels]
    rng = np.random.default_rng(seed)

    def work(n, c, v):  # c is a node of layer n
        if n == 0:
            x = v.copy()
            for _ in range(tau[0]):
                x -= mu * As[c].T @ (As[c] @ x - bs[c]) / m
            return x
        for _ in range(tau[n]):
            v = aggregate(n, c, v)
        return v

    def aggregate(n, u, v):
        out = v.copy()
        for c, a in zip(tree.children(n, u), tree.weights(n, u)):
            diff = (work(n - 1, c, v) - v).astype(np.float32)
            codec = codecs[n - 1]
            out += a * codec.decode(codec.encode_vector(diff, rng), d).astype(np.float64)
        return out

    w = np.zeros(d) if w0 is None else w0.copy()
    losses = [global_loss(w, As, bs)]
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(rounds):
            w = aggregate(tree.N, 0, w)
            losses.append(global_loss(w, As, bs))
            if not np.isfinite(losses[-1]) or losses[-1] > 1e12:
                break
    return losses, w


def drift_check(tree, tau, levels, mu, As, bs, seed):
    """Step-synchronous run of one round from w_t; returns (sum_k Phi^k, sum_k H^k, w_{t+1})
    with Phi^k = sum_i p_i ||x_i^k - w_t||^2, H^k = sum_i p_i ||grad f_i(x_i^k)||^2."""
    m, d = As[0].shape
    D, N = tree.num_devices, tree.N
    rng, codecs, w0, x, node = round_start(tree, levels, d, seed)
    K = math.prod(tau)
    phi = h = 0.0
    for k in range(K):
        grads = np.stack([As[i].T @ (As[i] @ x[i] - bs[i]) / m for i in range(D)])
        phi += np.mean(np.sum((x - w0) ** 2, axis=1))
        h += np.mean(np.sum(grads ** 2, axis=1))
        x = x - mu * grads
        aggregate_due(tree, tau, k, x, node, codecs, rng)
    return phi, h, node[N][0]


def round_start(tree, levels, d, seed):
    """A step-by-step round's start: the quantizer stream, the links' QSGD codecs, ``w0``, every device's model and
    every node's last model (all ``w0``)."""
    w0 = np.random.default_rng(99).standard_normal(d)
    node = [np.tile(w0, (tree.num_nodes(n), 1)) for n in range(tree.N + 1)]  # model each node last set
    return (np.random.default_rng(seed), [make_codec(s, 0) for s in levels], w0, np.tile(w0, (tree.num_devices, 1)),
            node)


def aggregate_due(tree, tau, k, x, node, codecs, rng):
    """After step ``k``: every layer due aggregates bottom-up, in place on the devices' models ``x`` and the
    nodes' last models ``node[n]`` (QSGD of each child's difference from the node), each node's new model sent
    down its subtree."""
    d = x.shape[1]
    for n in range(1, tree.N + 1):
        if (k + 1) % math.prod(tau[:n]):
            break
        for u in range(tree.num_nodes(n)):
            kids = tree.children(n, u)
            cur = x[kids.start:kids.stop] if n == 1 else node[n - 1][kids.start:kids.stop]
            new = node[n][u].copy()
            for xc, a in zip(cur, tree.weights(n, u)):
                diff = (xc - node[n][u]).astype(np.float32)
                new += a * codecs[n - 1].decode(codecs[n - 1].encode_vector(diff, rng), d).astype(np.float64)
            node[n][u] = new
            for lay in range(n):  # broadcast down the subtree
                for c in range(tree.num_nodes(lay)):
                    if tree.device_range(lay, c).start in tree.device_range(n, u):
                        node[lay][c] = new
            x[tree.device_range(n, u).start:tree.device_range(n, u).stop] = new


@pytest.mark.parametrize("tau,levels", [((3, 2), (0, 0)), ((2, 3), (4, 2)), ((2, 2, 2), (2, 4, 0))])
def test_drift_lemma_holds_in_simulation(tau, levels):
    """sum_k E Phi^k <= mu^2 B_Gamma sum_k E H^k (sigma = 0), the bound's key lemma."""
    spec = [[2, 1], [3]] if len(tau) == 3 else [2, 3]
    tree = Tree.from_nested(spec)
    d = 12
    As, bs, L = least_squares(tree.num_devices, d, 20, 0)
    qs = q_per_link(d, link_codecs(levels, 0))
    bg = condition_terms(tau, qs, tree).B_gamma
    mu = 0.5 / L
    runs = [drift_check(tree, list(tau), levels, mu, As, bs, s)[:2] for s in range(8 if any(levels) else 1)]
    phi, h = np.mean(runs, axis=0)
    assert phi <= mu ** 2 * bg * h
    assert phi > 0.02 * mu ** 2 * bg * h  # and the lemma is not absurdly loose here


@pytest.mark.parametrize("tau,spec", [((3, 2), [2, 3]), ((2, 1, 3), [[2, 1], [3]])])
def test_step_synchronous_model_matches_the_recursion(tau, spec):
    """Without quantization the per-step simulation above is the recursion of docs/algorithm.md."""
    tree = Tree.from_nested(spec)
    As, bs, L = least_squares(tree.num_devices, 6, 10, 2)
    w1 = drift_check(tree, list(tau), (0,) * len(tau), 0.3 / L, As, bs, 0)[2]
    _, w2 = run_recursion(tree, list(tau), (0,) * len(tau), 0.3 / L, As, bs, 1, 0,
                          w0=np.random.default_rng(99).standard_normal(6))
    np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau,levels,spec", [((4,), (2,), 5), ((2, 3), (0, 0), [3, 2]),
                                             ((2, 2, 2), (4, 2, 8), [[2, 1], [3]])])
def test_admissible_lr_converges_and_large_lr_diverges(tau, levels, spec):
    tree = Tree.from_nested(spec)
    d = 10
    As, bs, L = least_squares(tree.num_devices, d, 25, 1)
    qs = q_per_link(d, link_codecs(levels, 0))
    mu = max_lr(L, tau, qs, tree)
    ok, _ = run_recursion(tree, list(tau), levels, 0.99 * mu, As, bs, 150, 0)
    fstar = global_loss(np.linalg.lstsq(np.vstack(As), np.concatenate(bs), rcond=None)[0], As, bs)
    assert np.all(np.isfinite(ok)) and ok[-1] - fstar < 0.05 * (ok[0] - fstar)
    big = 3.0 / L  # local steps amplify the top curvature direction by 2 each
    assert big > 5 * mu
    bad, _ = run_recursion(tree, list(tau), levels, big, As, bs, 150, 0)
    assert not np.isfinite(bad[-1]) or bad[-1] > 1e6 * bad[0]
