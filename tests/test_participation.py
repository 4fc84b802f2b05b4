"""Partial participation (sampling, availability, weights, expected messages) and the
server optimisers: pure numpy, no MPI.

The statistical checks use fixed seeds, so they are deterministic; their
tolerances are ``5`` standard errors (binomial or sample), far above what the
fixed draws produce and far below the effects they guard against.
"""
from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest

from qmlhfl_mpi.core import rng
from qmlhfl_mpi.core.participation import Participation, expected_messages, inclusion, sample_size
from qmlhfl_mpi.core.registry import PluginError
from qmlhfl_mpi.core.server_opt import (
    SERVER_OPTIMIZERS,
    Adam,
    Average,
    Momentum,
    ServerOptimizer,
    Yogi,
    make_server_optimizer,
)
from qmlhfl_mpi.core.topology import Tree, messages_per_round

F32 = np.float32


def _gen(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


# ---- sample_size -----------------------------------------------------------
@pytest.mark.parametrize("f,C,m", [
    (1.0, 7, 7), (0.5, 4, 2),
    (0.5, 3, 2), (0.5, 5, 3), (0.75, 2, 2), (0.25, 2, 1), (0.125, 4, 1),  # halves round up (exact in binary)
    (0.1, 3, 1), (0.01, 50, 1), (1e-9, 1000, 1),                          # at least one
    (0.3, 10, 3), (0.34, 10, 3), (0.36, 10, 4), (0.99, 3, 3),
    (0.5, 1, 1), (0.2, 0, 0),
])
def test_sample_size_rounds_half_up_between_one_and_all(f, C, m):
    assert sample_size(f, C) == m


@pytest.mark.parametrize("f", [0.0, -0.1, 1.5, 1.0000001, math.nan])
def test_sample_size_rejects_fraction_outside_range(f):
    with pytest.raises(ValueError, match=r"out of range: expected 0 < f <= 1"):
        sample_size(f, 5)


def test_sample_size_is_monotone_and_bounded():
    for C in range(1, 40):
        prev = 0
        for k in range(1, 101):
            m = sample_size(k / 100, C)
            assert 1 <= m <= C and m >= prev
            prev = m
        assert prev == C


# ---- Participation: validation -----------------------------------------------
def test_participation_validates_its_fields():
    with pytest.raises(ValueError, match=r"one value per layer"):
        Participation((1.0, 0.5), (1.0,))
    with pytest.raises(ValueError, match=r"participation.fraction\[1\] = 0.0 out of range"):
        Participation((1.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"participation.availability\[0\] = 1.2 out of range"):
        Participation((1.0, 1.0), (1.2, 1.0))
    with pytest.raises(ValueError, match=r"participation.weighting = 'fair'.*'renormalize', 'unbiased'"):
        Participation((1.0,), (1.0,), "fair")
    full = Participation.full(3)
    assert full.is_full and all(full.layer_is_full(n) for n in (1, 2, 3))
    part = Participation((1.0, 0.5, 1.0), (1.0, 1.0, 0.9))
    assert not part.is_full
    assert [part.layer_is_full(n) for n in (1, 2, 3)] == [True, False, False]


# ---- Participation.participants ----------------------------------------------
def test_participants_match_the_keyed_streams():
    seed, C = 11, 9
    part = Participation((0.4, 1.0, 0.6), (0.7, 0.8, 1.0))
    m = sample_size(0.4, C)
    for n, u, t, call in [(1, 0, 0, 0), (1, 3, 5, 2), (2, 1, 7, 0), (3, 0, 4, 1), (1, 2, 123, 9)]:
        got = part.participants(seed, n, u, t, call, C)
        f, p = part.fraction[n - 1], part.availability[n - 1]
        if f < 1:
            drawn = np.sort(_gen(seed, 8, n, u, t, call).choice(C, size=sample_size(f, C), replace=False))
        else:
            drawn = np.arange(C)
        if p < 1:
            up = _gen(seed, 9, n, u, t, call).random(C) < p
            drawn = drawn[up[drawn]]
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, drawn)
    # the purposes are the documented stream ids
    assert (rng.SAMPLE, rng.AVAIL) == (8, 9)
    # sampling only (p = 1): exactly m distinct children, ascending
    only = Participation((0.4,), (1.0,))
    for t in range(50):
        got = only.participants(seed, 1, 0, t, 0, C)
        assert len(got) == m and len(np.unique(got)) == m
        assert np.all(np.diff(got) > 0) and got.min() >= 0 and got.max() < C


def test_availability_drops_children_with_the_keyed_uniforms():
    seed, C, p = 3, 12, 0.6
    part = Participation((1.0, 1.0), (p, 1.0))
    dropped_some = False
    for t in range(30):
        for call in range(3):
            got = part.participants(seed, 1, 4, t, call, C)
            want = np.flatnonzero(_gen(seed, 9, 1, 4, t, call).random(C) < p)
            np.testing.assert_array_equal(got, want)
            dropped_some |= len(got) < C
    assert dropped_some
    # layer 2 is full: everyone, no draw
    np.testing.assert_array_equal(part.participants(seed, 2, 0, 0, 0, 5), np.arange(5))


def test_participants_depend_only_on_the_key():
    seed, C = 5, 10
    a = Participation((0.3, 0.5), (0.8, 1.0))
    b = Participation((0.3, 0.2), (0.8, 0.5), "unbiased")  # other layer and weighting differ
    keys = [(1, u, t, call) for u in range(3) for t in range(4) for call in range(2)]
    first = {k: a.participants(seed, *k, C) for k in keys}
    for k in reversed(keys):  # any order, any object with the same layer values: the same sets
        np.testing.assert_array_equal(a.participants(seed, *k, C), first[k])
        np.testing.assert_array_equal(b.participants(seed, *k, C), first[k])
    # every component of the key matters (the layer too: same values on every layer)
    same = Participation((0.3,) * 12, (0.8,) * 12)
    base = (1, 0, 0, 0)
    for i in range(4):
        sets = set()
        for j in range(12):
            key = list(base)
            key[i] += j
            sets.add(tuple(same.participants(seed, *key, C).tolist()))
        assert len(sets) > 1, f"key component {i} does not change the draw"
    assert len({tuple(same.participants(s, *base, C).tolist()) for s in range(12)}) > 1


def test_empirical_inclusion_matches_m_over_c_times_p():
    seed, C, f, p, R = 2024, 10, 0.4, 0.75, 4000
    part = Participation((f,), (p,))
    pi = inclusion(part, 1, C)
    assert pi == pytest.approx(sample_size(f, C) / C * p) and pi == pytest.approx(0.3)
    counts = np.zeros(C)
    sizes = np.zeros(R)
    for t in range(R):
        got = part.participants(seed, 1, 0, t, 0, C)
        counts[got] += 1
        sizes[t] = len(got)
    tol = 5 * math.sqrt(pi * (1 - pi) / R)  # 5 binomial standard errors
    assert np.max(np.abs(counts / R - pi)) < tol, (counts / R, pi, tol)
    m = sample_size(f, C)
    assert sizes.max() <= m
    assert abs(sizes.mean() - part.expected_messages(1, C)) < 5 * math.sqrt(m * p * (1 - p) / R)


def test_inclusion():
    part = Participation((0.5, 1.0, 0.3), (0.9, 0.6, 1.0))
    assert inclusion(part, 1, 3) == pytest.approx(2 / 3 * 0.9)
    assert inclusion(part, 2, 7) == pytest.approx(0.6)
    assert inclusion(part, 3, 10) == pytest.approx(0.3)
    assert inclusion(part, 3, 1) == 1.0  # at least one child
    assert inclusion(part, 1, 0) == 0.0
    assert inclusion(Participation.full(2), 2, 5) == 1.0
    assert part.expected_messages(1, 3) == pytest.approx(2 * 0.9)
    assert part.expected_messages(1, 0) == 0.0


# ---- Participation.weights ---------------------------------------------------
D = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])


def test_renormalize_weights():
    part = Participation((0.5,), (0.8,), "renormalize")
    for t in range(40):
        chosen = part.participants(1, 1, 0, t, 0, len(D))
        if len(chosen) == 0:
            continue
        a = part.weights(1, D, chosen)
        assert a.dtype == np.float32 and a.shape == chosen.shape
        np.testing.assert_array_equal(a, (D[chosen] / D[chosen].sum()).astype(np.float32))
        assert abs(float(a.astype(np.float64).sum()) - 1.0) <= len(a) * np.finfo(np.float32).eps


def test_unbiased_weights_formula():
    f, p = 0.5, 0.8
    part = Participation((f,), (p,), "unbiased")
    pi = sample_size(f, len(D)) / len(D) * p
    for t in range(40):
        chosen = part.participants(1, 1, 0, t, 0, len(D))
        a = part.weights(1, D, chosen)
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, (D[chosen] / D.sum() / pi).astype(np.float32))


def test_unbiased_weights_give_the_full_average_in_expectation():
    f, p, R = 0.4, 0.8, 4000
    part = Participation((f,), (p,), "unbiased")
    x = np.random.default_rng(0).uniform(0.5, 2.0, size=(len(D), 3))
    target = (D / D.sum()) @ x
    est = np.empty((R, 3))
    for t in range(R):
        chosen = part.participants(77, 1, 2, t, 0, len(D))
        est[t] = part.weights(1, D, chosen).astype(np.float64) @ x[chosen]
    tol = 5 * est.std(axis=0) / math.sqrt(R)
    assert np.all(np.abs(est.mean(axis=0) - target) < tol), (est.mean(axis=0), target, tol)
    # meaningful: an inclusion probability without the availability factor would be off by 1/p
    assert np.all(tol < 0.25 * (1 / p - 1) * target)
    # the renormalised weights are biased here (a check that the test can tell them apart)
    ren = Participation((f,), (p,))
    est_r = np.array([ren.weights(1, D, c).astype(np.float64) @ x[c]
                      for c in (ren.participants(77, 1, 2, t, 0, len(D)) for t in range(R)) if len(c)])
    assert np.any(np.abs(est_r.mean(axis=0) - target) > 5 * est_r.std(axis=0) / math.sqrt(len(est_r)))


@pytest.mark.parametrize("weighting", ["renormalize", "unbiased"])
def test_full_participation_gives_the_tree_weights(weighting):
    tree = Tree.from_nested([[3, 2], [4, 1, 2]])
    samples = np.arange(1, tree.num_devices + 1, dtype=np.float64) * 7
    full = Participation((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), weighting)
    partial = Participation((0.5, 1.0, 1.0), (0.9, 1.0, 1.0), weighting)  # layers 2, 3 stay full
    for part, layers in ((full, (1, 2, 3)), (partial, (2, 3))):
        for n in layers:
            for u in range(tree.num_nodes(n)):
                for s in (None, samples):
                    C = len(tree.children(n, u))
                    chosen = part.participants(9, n, u, 0, 0, C)
                    np.testing.assert_array_equal(chosen, np.arange(C))
                    got = part.weights(n, tree.child_sizes(n, u, s), chosen)
                    assert got.dtype == np.float32
                    np.testing.assert_array_equal(got, tree.weights(n, u, s).astype(np.float32))


# ---- expected messages ---------------------------------------------------------
def _simulate_messages(tree: Tree, tau: tuple[int, ...], part: Participation, seed: int, rounds: int) -> np.ndarray:
    """Uplink messages per round and link, from the recursion with the same participants() keys
    as the aggregator: node (n, u)'s k-th aggregation of round t draws with call k."""
    out = np.zeros((rounds, tree.N))

    def aggregate(t: int, n: int, u: int, calls: dict[tuple[int, int], int]) -> None:
        k = calls.get((n, u), 0)
        calls[(n, u)] = k + 1
        kids = tree.children(n, u)
        chosen = part.participants(seed, n, u, t, k, len(kids))
        out[t, n - 1] += len(chosen)
        if n > 1:
            for c in (kids.start + chosen).tolist():
                for _ in range(tau[n - 1]):  # a layer-(n-1) node aggregates tau_n times per call
                    aggregate(t, n - 1, c, calls)

    for t in range(rounds):
        aggregate(t, tree.N, 0, {})
    return out


TREE3 = Tree.from_nested([[3, 2], [4, 1, 2], [2, 2]])
TAU3 = (1, 3, 2)


def test_expected_messages_with_full_participation_is_messages_per_round():
    full = Participation.full(3)
    sim = _simulate_messages(TREE3, TAU3, full, 0, 2)
    for n in (1, 2, 3):
        want = messages_per_round(TREE3, TAU3, n)
        assert expected_messages(TREE3, TAU3, n, full) == want
        assert expected_messages(TREE3, TAU3, n, None) == want
        assert np.all(sim[:, n - 1] == want)
    # two-layer tree too
    tree = Tree.uniform([2, 3])
    for n in (1, 2):
        assert expected_messages(tree, (2, 2), n, Participation.full(2)) == messages_per_round(tree, (2, 2), n)


@pytest.mark.parametrize("fraction,availability", [
    ((0.5, 0.6, 1.0), (0.9, 1.0, 0.7)),
    ((1.0, 0.5, 0.5), (0.8, 0.9, 1.0)),
    ((0.7, 1.0, 1.0), (0.6, 1.0, 1.0)),
])
def test_expected_messages_matches_monte_carlo(fraction, availability):
    part = Participation(fraction, availability)
    R = 300
    sim = _simulate_messages(TREE3, TAU3, part, seed=42, rounds=R)
    for n in (1, 2, 3):
        exp = expected_messages(TREE3, TAU3, n, part)
        assert exp <= messages_per_round(TREE3, TAU3, n)
        col = sim[:, n - 1]
        tol = 5 * col.std() / math.sqrt(R) + 1e-9
        assert abs(col.mean() - exp) < tol, (n, col.mean(), exp, tol)
    assert expected_messages(TREE3, TAU3, 1, part) < messages_per_round(TREE3, TAU3, 1)


def test_expected_messages_closed_form_on_a_uniform_tree():
    tree = Tree.uniform([2, 3])  # cloud -> 2 edges -> 3 devices each
    part = Participation((0.5, 1.0), (0.9, 1.0))
    # link 1: 2 edges x tau_2 aggregations x m=2 drawn x p=0.9
    assert expected_messages(tree, (2, 2), 1, part) == pytest.approx(2 * 2 * 2 * 0.9)
    assert expected_messages(tree, (2, 2), 2, part) == pytest.approx(2.0)
    part2 = Participation((1.0, 0.5), (1.0, 0.5))  # the cloud draws one edge, up with 0.5
    assert expected_messages(tree, (2, 2), 2, part2) == pytest.approx(0.5)
    assert expected_messages(tree, (2, 2), 1, part2) == pytest.approx(6 * 2 * 0.25)


# ---- server optimisers ---------------------------------------------------------
def _vectors(steps: int, d: int = 33, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    r = np.random.default_rng(seed)
    v = r.standard_normal(d).astype(F32)
    gs = [(r.standard_normal(d) * 10.0 ** r.integers(-3, 2)).astype(F32) for _ in range(steps)]
    if steps > 1:
        gs[1][:5] = 0  # exact zeros: s = 0, sign(0) in yogi
    return v, gs


def test_registered_server_optimizers():
    assert SERVER_OPTIMIZERS.names() == ("avg", "momentum", "adam", "yogi")
    assert isinstance(make_server_optimizer("avg"), Average)
    assert type(make_server_optimizer("momentum")) is Momentum
    assert type(make_server_optimizer("adam")) is Adam
    assert type(make_server_optimizer("yogi")) is Yogi
    st = make_server_optimizer("yogi").init_state(4)
    assert set(st) == {"m", "s"} and all(a.dtype == F32 and not a.any() for a in st.values())
    assert make_server_optimizer("avg").init_state(4) == {}


def test_avg_is_v_plus_g():
    v, gs = _vectors(3)
    opt = make_server_optimizer("avg", lr=0.3, momentum=0.5, betas=(0.1, 0.2), eps=1.0)  # all ignored
    st = opt.init_state(len(v))
    for g in gs:
        new = opt.apply(v, g, st)
        assert new.dtype == F32
        np.testing.assert_array_equal(new, v + g)


def test_momentum_with_beta_zero_and_lr_one_is_v_plus_g():
    v, gs = _vectors(4)
    opt = make_server_optimizer("momentum", lr=1.0, momentum=0.0)
    st = opt.init_state(len(v))
    for g in gs:
        new = opt.apply(v, g, st)
        np.testing.assert_array_equal(new, v + g)
        v = new


def test_momentum_state_evolves_as_float32_loop():
    v, gs = _vectors(6)
    lr, beta = 0.7, 0.9
    opt = make_server_optimizer("momentum", lr=lr, momentum=beta)
    st = opt.init_state(len(v))
    m = np.zeros_like(v)
    w = v.copy()
    for g in gs:
        m = F32(beta) * m + g
        w_ref = w + F32(lr) * m
        w = opt.apply(w, g, st)
        assert w.dtype == F32 and st["m"].dtype == F32
        np.testing.assert_array_equal(st["m"], m)
        np.testing.assert_array_equal(w, w_ref)


def _adam_ref(kind: str, v: np.ndarray, gs: list[np.ndarray], lr: float, betas: tuple[float, float], eps: float):
    """Reddi et al. 2021, Algorithm 2 (FedAdam / FedYogi), no bias correction, in float32."""
    lr32, b1, b2, eps32 = F32(lr), F32(betas[0]), F32(betas[1]), F32(eps)
    m = np.zeros_like(v)
    s = np.zeros_like(v)
    out = []
    for g in gs:
        m = b1 * m + (F32(1) - b1) * g
        if kind == "adam":
            s = b2 * s + (F32(1) - b2) * (g * g)
        else:
            s = s - (F32(1) - b2) * (g * g) * np.sign(s - g * g)
        v = v + lr32 * m / (np.sqrt(s) + eps32)
        out.append((v, m, s))
    return out


@pytest.mark.parametrize("kind", ["adam", "yogi"])
@pytest.mark.parametrize("lr,betas,eps", [(0.01, (0.9, 0.99), 1e-3), (0.5, (0.0, 0.5), 1e-6), (1.0, (0.3, 0.0), 0.1)])
def test_adam_and_yogi_bit_for_bit(kind, lr, betas, eps):
    v, gs = _vectors(8, seed=1)
    opt = make_server_optimizer(kind, lr=lr, betas=betas, eps=eps)
    assert opt.state_names == ("m", "s")
    st = opt.init_state(len(v))
    w = v.copy()
    for g, (w_ref, m_ref, s_ref) in zip(gs, _adam_ref(kind, v, gs, lr, betas, eps)):
        w = opt.apply(w, g, st)
        assert w.dtype == F32
        np.testing.assert_array_equal(st["m"], m_ref)
        np.testing.assert_array_equal(st["s"], s_ref)
        np.testing.assert_array_equal(w, w_ref)
    assert np.isfinite(w).all()


def test_default_parameters():
    m = make_server_optimizer("momentum")
    a = make_server_optimizer("adam")
    assert (m.lr, m.momentum) == (1.0, 0.9)
    assert (a.lr, a.betas, a.eps) == (0.01, (0.9, 0.99), 1e-3)
    assert "adam" in a.name and "yogi" in make_server_optimizer("yogi").name


def test_plugin_reference(tmp_path, monkeypatch):
    mod = "qmlhfl_test_server_plugin_x7"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent("""
        import numpy as np
        from qmlhfl_mpi.core.server_opt import ServerOptimizer

        class Half(ServerOptimizer):
            def __init__(self, lr=1.0, momentum=0.0, betas=(0.9, 0.99), eps=1e-3):
                self.lr = lr
            @property
            def name(self):
                return "half"
            def apply(self, v, g, state):
                return v + np.float32(0.5 * self.lr) * g

        def not_an_optimizer(**kw):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        opt = make_server_optimizer(f"{mod}:Half", lr=2.0)
        assert isinstance(opt, ServerOptimizer) and opt.name == "half"
        v, gs = _vectors(1)
        np.testing.assert_array_equal(opt.apply(v, gs[0], {}), v + F32(1.0) * gs[0])
        # a file reference works the same way
        fopt = make_server_optimizer(f"{tmp_path / (mod + '.py')}:Half")
        assert fopt.name == "half"
        with pytest.raises(PluginError, match=r"gave int; subclass qmlhfl_mpi.core.server_opt.ServerOptimizer"):
            make_server_optimizer(f"{mod}:not_an_optimizer")
        with pytest.raises(PluginError, match=r"has no attribute 'Nope'"):
            make_server_optimizer(f"{mod}:Nope")
    finally:
        sys.modules.pop(mod, None)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(PluginError, match=r"server.optimizer = 'sgdm'.*'avg', 'momentum', 'adam', 'yogi'"):
        make_server_optimizer("sgdm")


@pytest.mark.parametrize("kind,params,key", [
    ("adam", {"betas": (0.9, 1.0)}, r"server.betas\[1\] = 1.0 out of range"),
    ("adam", {"betas": (-0.1, 0.9)}, r"server.betas\[0\] = -0.1 out of range"),
    ("yogi", {"betas": (0.9, 0.99, 0.5)}, r"server.betas = \[0.9, 0.99, 0.5\] must be \[b1, b2\]"),
    ("adam", {"lr": 0.0}, r"server.lr = 0.0 must be > 0"),
    ("yogi", {"lr": -1.0}, r"server.lr = -1.0 must be > 0"),
    ("momentum", {"lr": 0.0}, r"server.lr = 0.0 must be > 0"),
    ("adam", {"eps": 0.0}, r"server.eps = 0.0 must be > 0"),
    ("momentum", {"momentum": 1.0}, r"server.momentum = 1.0 out of range"),
    ("momentum", {"momentum": -0.5}, r"server.momentum = -0.5 out of range"),
])
def test_bad_parameters_raise_value_error_naming_the_key(kind, params, key):
    with pytest.raises(ValueError, match=key):
        make_server_optimizer(kind, **params)
