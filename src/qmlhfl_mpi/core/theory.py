"""Convergence bound, learning-rate condition and deadline (latency) model.

Pure math (``math`` and numpy only): no torch, no MPI, no h5py.  The derivation
is written out step by step in ``docs/theory.md``; the symbols below follow it.

For iteration counts ``tau = [tau_1..tau_N]`` let ``T_m = tau_1 * ... * tau_m``
(``T_0 = 1``) and ``K = T_N`` (SGD steps per device per global round).  Per link
``n`` let ``q_n`` be the quantizer's variance factor, ``alpha_n`` the largest
aggregation weight ``a(c)`` of a layer-(n-1) node ``c`` in its parent and
``beta_n`` the largest global weight ``P_c`` (``D(c)/D``) of a layer-(n-1) node;
``S2 = sum_i p_i^2`` (``1/D`` with device weights).  Then

* ``Pi_m = prod_{n<=m} (1 + q_n alpha_n)``  (``Pi_0 = 1``; ``<= prod (1 + q_n)``)
* ``S_m = (T_{m+1}(T_{m+1}-1) - T_m(T_m-1)) / 2``
* ``B_Gamma = sum_{m=0}^{N-1} Pi_m S_m``  (drift coefficient)
* ``C_eps = sum_{m=1}^{N} q_m beta_m T_m Pi_{m-1}``  (injected-noise coefficient)
* ``A = 1 + C_eps``; ``kappa = 3`` (heterogeneous data) or ``1`` (IID)
* condition ``1 - A L mu - kappa B_Gamma L^2 mu^2 > 0``, which is *exactly*
  ``1 - L^2 mu^2 B > 0`` with ``B = ((A + sqrt(A^2 + 4 kappa B_Gamma)) / 2)^2``.

With ``Pi = 1`` the drift coefficient ``K(K-1)/2`` splits exactly into the
paper's visible terms ``tau_1(tau_1-1)/2 + sum_{n>=2} tau_n(tau_n-1)/2 T_{n-1}^2``
plus our cross-layer terms ``sum_{n=1}^{N-1} (T_n-1)(T_{n+1}-T_n)/2``.

Per-layer heterogeneity (``convergence_bound_layers``, docs/theory.md section 15):
with ``zeta_n^2`` the divergence of a layer-n node's children from the node,
``K0 = K(K-1)/2``, ``Q = sum_{m=1}^{N-1} w_m q_m alpha_m T_m Pi_{m-1} (K - T_m)``
(``w_{N-1} = 1``, else 2), ``lambda = sqrt(Q / K0)``,
``B_n = (T_n - 1)(2K - T_n)/2`` and ``Z = sum_n zeta_n^2``:

* ``B_Gamma' = (sqrt(K0) + sqrt(Q))^2`` replaces ``B_Gamma`` in the condition;
* the heterogeneity drift is ``2 sum_n c_n zeta_n^2`` with
  ``c_n = (1 + lambda) B_n + (1 + 1/lambda) Q`` (``layer_drift_coefficients``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .codecs import Codec
from .topology import Tree, aggregations_per_round

__all__ = [
    "q_per_link", "error_factor", "TreeConstants", "tree_constants", "ConditionTerms",
    "condition_terms", "lr_condition_B", "lr_condition", "max_lr", "BoundTerms",
    "convergence_bound_terms", "convergence_bound", "LatencyModel", "RoundTimeParts",
    "message_bits", "round_time_parts", "round_time",
    "LayerConditionTerms", "layer_condition_terms", "layer_drift_coefficients", "LayerBoundTerms",
    "convergence_bound_layers_terms", "convergence_bound_layers",
]


# ---- validation helpers ------------------------------------------------------
def _int_list(name: str, values: Sequence[int], n: int | None, lo: int, hi: int | None = None) -> tuple[int, ...]:
    vals = tuple(values)
    if n is not None and len(vals) != n:
        raise ValueError(f"{name}={list(vals)!r} has {len(vals)} entries: the tree has N={n} links, give {n}")
    if len(vals) == 0:
        raise ValueError(f"{name}=[] is empty: give one value per link (N >= 1)")
    for i, v in enumerate(vals):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
            rng = f"{lo} <= value <= {hi}" if hi is not None else f"an integer >= {lo}"
            raise ValueError(f"{name}[{i}]={v!r} out of range: expected {rng}")
    return tuple(int(v) for v in vals)


def _positive(name: str, x: float, allow_zero: bool = False) -> float:
    x = float(x)
    ok = x >= 0 if allow_zero else x > 0
    if not (ok and math.isfinite(x)):
        raise ValueError(f"{name}={x!r} out of range: expected a finite value {'>= 0' if allow_zero else '> 0'}")
    return x


def _prefix_products(tau: Sequence[int]) -> list[int]:
    """``[T_0, T_1, ..., T_N]`` with ``T_m = tau_1 * ... * tau_m``."""
    out = [1]
    for t in tau:
        out.append(out[-1] * t)
    return out


# ---- quantizer factors ---------------------------------------------------------
def q_per_link(d: int, codecs: Sequence[Codec]) -> list[float]:
    """Variance factor ``q_n`` of each link's codec for a model of ``d`` parameters.

    ``E||Q_n(x) - x||^2 <= q_n ||x||^2``; the codec objects say what it is (QSGD:
    ``q = min(B/s^2, sqrt(B)/s)`` for bucket length ``B``; ``0`` for float32).
    """
    _check_dim(d)
    if len(codecs) == 0:
        raise ValueError("codecs=[] is empty: give one codec per link (N >= 1)")
    return [float(c.variance(int(d))) for c in codecs]


def _check_dim(d: int) -> None:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"model dimension d={d!r} out of range: expected an integer >= 1")


def error_factor(qs: Sequence[float]) -> float:
    """Worst-case compounding of quantization error across layers: ``prod(1 + q_n)``."""
    out = 1.0
    for i, q in enumerate(qs):
        out *= 1.0 + _positive(f"qs[{i}]", q, allow_zero=True)
    return out


# ---- tree constants --------------------------------------------------------------
@dataclass(frozen=True)
class TreeConstants:
    """What the bound needs from the tree (index ``n-1`` holds link ``n``).

    ``alpha[n-1] = max a(c)`` and ``beta[n-1] = max P_c`` over the nodes ``c`` of
    layer ``n-1``; ``s2 = sum_i p_i^2`` over devices.
    """

    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    s2: float

    @property
    def N(self) -> int:
        return len(self.alpha)


def tree_constants(tree: Tree, samples: np.ndarray | None = None) -> TreeConstants:
    """``alpha_n``, ``beta_n`` and ``S2`` of ``tree`` (device-count weights, or
    sample weights when per-device ``samples`` are given)."""
    if samples is None:
        per_dev = np.ones(tree.num_devices, dtype=np.float64)
    else:
        per_dev = np.asarray(samples, dtype=np.float64).reshape(-1)
        if per_dev.size != tree.num_devices or np.any(per_dev < 0) or per_dev.sum() <= 0:
            raise ValueError(
                f"samples has {per_dev.size} entries (min {per_dev.min(initial=0)}): expected "
                f"{tree.num_devices} non-negative counts with a positive sum"
            )
    cum = np.concatenate([[0.0], np.cumsum(per_dev)])
    total = cum[-1]
    weight = [(cum[st[1:]] - cum[st[:-1]]) / total for st in tree.starts]  # P_u per layer
    alpha, beta = [], []
    for n in range(1, tree.N + 1):
        child, parent = tree.starts[n - 1], tree.starts[n]
        par = np.searchsorted(parent, child[:-1], side="right") - 1
        pw = weight[n][par]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(pw > 0, weight[n - 1] / np.where(pw > 0, pw, 1.0), 0.0)
        alpha.append(float(a.max()))
        beta.append(float(weight[n - 1].max()))
    s2 = float(np.sum((per_dev / total) ** 2))
    return TreeConstants(tuple(alpha), tuple(beta), s2)


def _consts(tree: Tree | TreeConstants, samples: np.ndarray | None) -> TreeConstants:
    if isinstance(tree, TreeConstants):
        return tree
    if isinstance(tree, Tree):
        return tree_constants(tree, samples)
    raise ValueError(f"tree={tree!r}: expected a topology.Tree or a theory.TreeConstants")


# ---- learning-rate condition -----------------------------------------------------
@dataclass(frozen=True)
class ConditionTerms:
    """The pieces of ``B`` (see the module docstring and docs/theory.md)."""

    visible: float              # tau_1(tau_1-1)/2 + sum_{n>=2} tau_n(tau_n-1)/2 T_{n-1}^2 (paper)
    cross: float                # sum_{n=1}^{N-1} (T_n - 1)(T_{n+1} - T_n)/2 (ours)
    quant_drift: tuple[float, ...]  # (Pi_m - 1) S_m, m = 1..N-1 (ours)
    quant_noise: tuple[float, ...]  # q_m beta_m T_m Pi_{m-1}, m = 1..N (ours)
    kappa: float                # 3 heterogeneous, 1 IID

    @property
    def B_gamma(self) -> float:
        return self.visible + self.cross + sum(self.quant_drift)

    @property
    def C_eps(self) -> float:
        return sum(self.quant_noise)

    @property
    def A(self) -> float:
        return 1.0 + self.C_eps

    @property
    def B(self) -> float:
        a, c = self.A, self.kappa * self.B_gamma
        return ((a + math.sqrt(a * a + 4.0 * c)) / 2.0) ** 2


def _terms(tau: tuple[int, ...], qs: Sequence[float], c: TreeConstants, iid: bool) -> ConditionTerms:
    N = len(tau)
    T = _prefix_products(tau)
    pi = [1.0]
    for n in range(1, N + 1):
        pi.append(pi[-1] * (1.0 + qs[n - 1] * c.alpha[n - 1]))
    S = [(T[m + 1] * (T[m + 1] - 1) - T[m] * (T[m] - 1)) / 2.0 for m in range(N)]
    visible = tau[0] * (tau[0] - 1) / 2.0 + sum(
        tau[n - 1] * (tau[n - 1] - 1) / 2.0 * T[n - 1] ** 2 for n in range(2, N + 1))
    cross = sum((T[n] - 1) * (T[n + 1] - T[n]) / 2.0 for n in range(1, N))
    quant_drift = tuple((pi[m] - 1.0) * S[m] for m in range(1, N))
    quant_noise = tuple(qs[m - 1] * c.beta[m - 1] * T[m] * pi[m - 1] for m in range(1, N + 1))
    return ConditionTerms(float(visible), float(cross), quant_drift, quant_noise, 1.0 if iid else 3.0)


def condition_terms(tau: Sequence[int], qs: Sequence[float], tree: Tree | TreeConstants, *,
                    samples: np.ndarray | None = None, iid: bool = False) -> ConditionTerms:
    """All terms of the learning-rate condition for ``tau`` and per-link ``qs``.

    ``tree`` may be a :class:`Tree` or precomputed :class:`TreeConstants`.
    ``iid=True`` uses the identical-data analysis (``kappa = 1``).
    """
    c = _consts(tree, samples)
    t = _int_list("tau", tau, c.N, 1)
    if len(qs) != c.N:
        raise ValueError(f"qs={list(qs)!r} has {len(qs)} entries: the tree has N={c.N} links, give {c.N}")
    q = [_positive(f"qs[{i}]", v, allow_zero=True) for i, v in enumerate(qs)]
    return _terms(t, q, c, iid)


def lr_condition_B(tau: Sequence[int], qs: Sequence[float], tree: Tree | TreeConstants, *,
                   samples: np.ndarray | None = None, iid: bool = False) -> float:
    """``B(tau, q, tree)`` such that the step size ``mu`` is admissible iff
    ``1 - L^2 mu^2 B > 0``."""
    return condition_terms(tau, qs, tree, samples=samples, iid=iid).B


def lr_condition(mu: float, L: float, tau: Sequence[int], qs: Sequence[float],
                 tree: Tree | TreeConstants, *, samples: np.ndarray | None = None, iid: bool = False) -> float:
    """Value of ``1 - L^2 mu^2 B``; the bound holds when it is ``> 0``."""
    mu, L = _positive("mu", mu), _positive("L", L)
    return 1.0 - L * L * mu * mu * lr_condition_B(tau, qs, tree, samples=samples, iid=iid)


def max_lr(L: float, tau: Sequence[int], qs: Sequence[float], tree: Tree | TreeConstants, *,
           samples: np.ndarray | None = None, iid: bool = False) -> float:
    """Supremum of admissible step sizes, ``1 / (L sqrt(B))``.

    The condition is strict: every ``mu < max_lr`` satisfies it and
    ``mu = max_lr`` makes ``1 - L^2 mu^2 B`` exactly zero (not admissible).
    """
    L = _positive("L", L)
    return 1.0 / (L * math.sqrt(lr_condition_B(tau, qs, tree, samples=samples, iid=iid)))


# ---- convergence bound ---------------------------------------------------------
@dataclass(frozen=True)
class BoundTerms:
    """Additive terms of the bound on ``(1/(T K)) sum E||grad f(y)||^2``."""

    optimisation: float   # 2 gap0 / (mu T K)
    sampling: float       # L mu sigma^2 S2
    quant_noise: float    # L mu C_eps (sigma^2 + 2 zeta^2)
    drift: float          # L^2 mu^2 B_Gamma (...) (sigma^2 + 2 zeta^2)
    condition: float      # 1 - L^2 mu^2 B (> 0 for a valid bound)

    @property
    def total(self) -> float:
        if not self.condition > 0:
            return math.inf
        return self.optimisation + self.sampling + self.quant_noise + self.drift


def _bound(T: int, mu: float, L: float, terms: ConditionTerms, s2: float, K: int, sigma2: float,
           gap0: float, zeta2: float, iid: bool) -> BoundTerms:
    x = L * mu
    cond = 1.0 - x * x * terms.B
    opt = 2.0 * gap0 / (mu * T * K)
    sampling = x * sigma2 * s2
    noise2 = sigma2 if iid else sigma2 + 2.0 * zeta2
    qn = x * terms.C_eps * noise2
    bg = terms.B_gamma
    if iid:
        drift = x * x * bg * noise2
    else:
        theta = 2.0 * x * x * bg
        drift = x * x * bg * (1.0 + 2.0 * x * terms.C_eps) / (1.0 - theta) * noise2 if theta < 1 else math.inf
    return BoundTerms(opt, sampling, qn, drift, cond)


def convergence_bound_terms(T: int, mu: float, L: float, tau: Sequence[int], qs: Sequence[float],
                            tree: Tree | TreeConstants, sigma2: float, gap0: float, zeta2: float = 0.0, *,
                            samples: np.ndarray | None = None, iid: bool = False) -> BoundTerms:
    """The bound's terms; see :func:`convergence_bound`."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T={T!r} out of range: expected an integer number of global rounds >= 1")
    mu, L = _positive("mu", mu), _positive("L", L)
    sigma2 = _positive("sigma2", sigma2, allow_zero=True)
    gap0 = _positive("gap0", gap0, allow_zero=True)
    zeta2 = _positive("zeta2", zeta2, allow_zero=True)
    if iid and zeta2 != 0:
        raise ValueError(f"zeta2={zeta2!r} with iid=True: identical data means zeta2 = 0")
    c = _consts(tree, samples)
    terms = condition_terms(tau, qs, c, iid=iid)
    return _bound(int(T), mu, L, terms, c.s2, math.prod(tau), sigma2, gap0, zeta2, iid)


def convergence_bound(T: int, mu: float, L: float, tau: Sequence[int], qs: Sequence[float],
                      tree: Tree | TreeConstants, sigma2: float, gap0: float, zeta2: float = 0.0, *,
                      samples: np.ndarray | None = None, iid: bool = False) -> float:
    """Bound on the average expected squared gradient norm over the ``T K`` (virtual)
    iterates of ``T`` global rounds; ``math.inf`` when ``mu`` violates the condition.

    Heterogeneous (default)::

        2 gap0/(mu T K) + L mu sigma2 S2 + (sigma2 + 2 zeta2) [L mu C_eps
            + L^2 mu^2 B_Gamma (1 + 2 L mu C_eps) / (1 - 2 L^2 mu^2 B_Gamma)]

    IID (``iid=True``, ``zeta2 = 0``)::

        2 gap0/(mu T K) + L mu sigma2 S2 + sigma2 [L mu C_eps + L^2 mu^2 B_Gamma]

    ``gap0 = f(w_0) - f*``, ``sigma2`` bounds each device's stochastic-gradient
    variance, ``zeta2`` bounds ``sum_i p_i ||grad f_i(w) - grad f(w)||^2``.
    """
    return convergence_bound_terms(T, mu, L, tau, qs, tree, sigma2, gap0, zeta2,
                                   samples=samples, iid=iid).total


# ---- per-layer heterogeneity (docs/theory.md section 15) ----------------------------
@dataclass(frozen=True)
class LayerConditionTerms:
    """Pieces of the per-layer bound (docs/theory.md section 15).

    ``K0 = K(K-1)/2`` is the gradient part of the drift, ``Q`` the martingale
    (quantization-noise) part, ``layer[n-1] = B_n = (T_n - 1)(2K - T_n)/2`` the
    coefficient of ``zeta_n^2`` in the gradient part; ``C_eps`` as in
    :class:`ConditionTerms`.
    """

    K0: float
    Q: float
    layer: tuple[float, ...]
    quant_noise: tuple[float, ...]   # q_m beta_m T_m Pi_{m-1}, m = 1..N (as before)
    kappa: float

    @property
    def lam(self) -> float:
        """The Young's-inequality weight ``lambda = sqrt(Q / K0)`` (0 without quantization)."""
        return math.sqrt(self.Q / self.K0) if self.Q > 0 else 0.0

    @property
    def B_gamma(self) -> float:
        """``(sqrt(K0) + sqrt(Q))^2 = (1 + lambda) K0 + (1 + 1/lambda) Q``."""
        return self.K0 + self.Q + 2.0 * math.sqrt(self.K0 * self.Q)

    @property
    def coefficients(self) -> tuple[float, ...]:
        """``c_n = (1 + lambda) B_n + (1 + 1/lambda) Q``: heterogeneity drift is ``2 sum c_n zeta_n^2``."""
        extra = self.Q + math.sqrt(self.Q * self.K0)  # (1 + 1/lambda) Q
        return tuple((1.0 + self.lam) * b + extra for b in self.layer)

    @property
    def C_eps(self) -> float:
        return sum(self.quant_noise)

    @property
    def A(self) -> float:
        return 1.0 + self.C_eps

    @property
    def B(self) -> float:
        a, c = self.A, self.kappa * self.B_gamma
        return ((a + math.sqrt(a * a + 4.0 * c)) / 2.0) ** 2


def _layer_terms(tau: tuple[int, ...], qs: Sequence[float], c: TreeConstants, iid: bool) -> LayerConditionTerms:
    N = len(tau)
    T = _prefix_products(tau)
    K = T[N]
    pi = [1.0]
    for n in range(1, N + 1):
        pi.append(pi[-1] * (1.0 + qs[n - 1] * c.alpha[n - 1]))
    Q = sum((1.0 if m == N - 1 else 2.0) * qs[m - 1] * c.alpha[m - 1] * T[m] * pi[m - 1] * (K - T[m])
            for m in range(1, N))
    layer = tuple((T[n] - 1) * (2 * K - T[n]) / 2.0 for n in range(1, N + 1))
    quant_noise = tuple(qs[m - 1] * c.beta[m - 1] * T[m] * pi[m - 1] for m in range(1, N + 1))
    return LayerConditionTerms(K * (K - 1) / 2.0, float(Q), layer, quant_noise, 1.0 if iid else 3.0)


def layer_condition_terms(tau: Sequence[int], qs: Sequence[float], tree: Tree | TreeConstants, *,
                          samples: np.ndarray | None = None, iid: bool = False) -> LayerConditionTerms:
    """Terms of the per-layer bound's learning-rate condition
    ``1 - A L mu - kappa B_Gamma' (L mu)^2 > 0`` (``B_Gamma' = (sqrt(K0) + sqrt(Q))^2``)."""
    c = _consts(tree, samples)
    t = _int_list("tau", tau, c.N, 1)
    if len(qs) != c.N:
        raise ValueError(f"qs={list(qs)!r} has {len(qs)} entries: the tree has N={c.N} links, give {c.N}")
    q = [_positive(f"qs[{i}]", v, allow_zero=True) for i, v in enumerate(qs)]
    return _layer_terms(t, q, c, iid)


def layer_drift_coefficients(tau: Sequence[int], qs: Sequence[float], tree: Tree | TreeConstants, *,
                             samples: np.ndarray | None = None) -> tuple[float, ...]:
    """Per-layer heterogeneity drift coefficients ``c_n``: the bound's drift term
    contains ``2 sum_n c_n zeta_n^2`` (times ``L^2 mu^2 (1 + 2 L mu C_eps)/(1 - theta)``).

    Without quantization ``c_n = B_n = (T_n - 1)(2K - T_n)/2``: only the steps
    since the last layer-``n`` aggregation carry ``zeta_n``, and ``c_N = K(K-1)/2``.
    """
    return layer_condition_terms(tau, qs, tree, samples=samples).coefficients


@dataclass(frozen=True)
class LayerBoundTerms:
    """Additive terms of the per-layer bound; ``drift = drift_sigma + sum(drift_layers)``."""

    optimisation: float            # 2 gap0 / (mu T K)
    sampling: float                # L mu sigma^2 S2
    quant_noise: float             # L mu C_eps (sigma^2 + 2 sum zeta_n^2)
    drift_sigma: float             # F B_Gamma' sigma^2, F = L^2 mu^2 (1 + 2 L mu C_eps)/(1 - theta)
    drift_layers: tuple[float, ...]  # F 2 c_n zeta_n^2, n = 1..N
    condition: float               # 1 - L^2 mu^2 B (> 0 for a valid bound)

    @property
    def drift(self) -> float:
        return self.drift_sigma + sum(self.drift_layers)

    @property
    def total(self) -> float:
        if not self.condition > 0:
            return math.inf
        return self.optimisation + self.sampling + self.quant_noise + self.drift


def _bound_layers(T: int, mu: float, L: float, terms: LayerConditionTerms, s2: float, K: int, sigma2: float,
                  gap0: float, zeta2: Sequence[float], iid: bool) -> LayerBoundTerms:
    x = L * mu
    cond = 1.0 - x * x * terms.B
    opt = 2.0 * gap0 / (mu * T * K)
    sampling = x * sigma2 * s2
    bg = terms.B_gamma
    qn = x * terms.C_eps * (sigma2 + 2.0 * sum(zeta2))
    if iid:
        return LayerBoundTerms(opt, sampling, qn, x * x * bg * sigma2, tuple(0.0 for _ in zeta2), cond)
    theta = 2.0 * x * x * bg
    if not theta < 1:
        return LayerBoundTerms(opt, sampling, qn, math.inf, tuple(math.inf for _ in zeta2), cond)
    f = x * x * (1.0 + 2.0 * x * terms.C_eps) / (1.0 - theta)
    layers = tuple(f * 2.0 * cn * z for cn, z in zip(terms.coefficients, zeta2))
    return LayerBoundTerms(opt, sampling, qn, f * bg * sigma2, layers, cond)


def _zeta_layers(zeta2_per_layer: Sequence[float], N: int, iid: bool) -> tuple[float, ...]:
    z = tuple(_positive(f"zeta2_per_layer[{i}]", v, allow_zero=True) for i, v in enumerate(zeta2_per_layer))
    if len(z) != N:
        raise ValueError(f"zeta2_per_layer={list(z)!r} has {len(z)} entries: the tree has N={N} links, give {N}")
    if iid and any(z):
        raise ValueError(f"zeta2_per_layer={list(z)!r} with iid=True: identical data means every zeta_n^2 = 0")
    return z


def convergence_bound_layers_terms(T: int, mu: float, L: float, tau: Sequence[int], qs: Sequence[float],
                                   tree: Tree | TreeConstants, sigma2: float, gap0: float,
                                   zeta2_per_layer: Sequence[float], *, samples: np.ndarray | None = None,
                                   iid: bool = False) -> LayerBoundTerms:
    """The per-layer bound's terms; see :func:`convergence_bound_layers`."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T={T!r} out of range: expected an integer number of global rounds >= 1")
    mu, L = _positive("mu", mu), _positive("L", L)
    sigma2 = _positive("sigma2", sigma2, allow_zero=True)
    gap0 = _positive("gap0", gap0, allow_zero=True)
    c = _consts(tree, samples)
    z = _zeta_layers(zeta2_per_layer, c.N, iid)
    terms = layer_condition_terms(tau, qs, c, iid=iid)
    return _bound_layers(int(T), mu, L, terms, c.s2, math.prod(tau), sigma2, gap0, z, iid)


def convergence_bound_layers(T: int, mu: float, L: float, tau: Sequence[int], qs: Sequence[float],
                             tree: Tree | TreeConstants, sigma2: float, gap0: float,
                             zeta2_per_layer: Sequence[float], *, samples: np.ndarray | None = None,
                             iid: bool = False) -> float:
    """Bound with per-layer heterogeneity (docs/theory.md section 15); ``math.inf``
    when ``mu`` violates its condition ``1 - A L mu - kappa B_Gamma' (L mu)^2 > 0``.

    ``zeta2_per_layer[n-1]`` bounds ``sum_u P_u sum_c a(c) ||grad f_c(w) - grad f_u(w)||^2``
    over the layer-``n`` nodes ``u`` and their children ``c`` (so ``sum_n zeta_n^2``
    is the old ``zeta2``).  Heterogeneous::

        2 gap0/(mu T K) + L mu sigma2 S2 + L mu C_eps (sigma2 + 2 sum_n zeta_n^2)
            + L^2 mu^2 (1 + 2 L mu C_eps) / (1 - 2 L^2 mu^2 B_Gamma') [B_Gamma' sigma2 + 2 sum_n c_n zeta_n^2]

    It equals :func:`convergence_bound` with ``zeta2 = zeta_N^2`` when every
    ``q_n = 0`` and ``zeta_1 = ... = zeta_{N-1} = 0``.
    """
    return convergence_bound_layers_terms(T, mu, L, tau, qs, tree, sigma2, gap0, zeta2_per_layer,
                                          samples=samples, iid=iid).total


# ---- deadline (latency) model ------------------------------------------------------
@dataclass(frozen=True)
class LatencyModel:
    """Seconds per local SGD step; per uplink ``n`` (layer n-1 -> n) its rate in
    bits/s and its latency in seconds per message."""

    step_time: float
    uplink_rate: tuple[float, ...]
    uplink_latency: tuple[float, ...]

    def __post_init__(self) -> None:
        _positive("step_time", self.step_time, allow_zero=True)
        rates = tuple(float(r) for r in self.uplink_rate)
        lats = tuple(float(v) for v in self.uplink_latency)
        if len(rates) == 0 or len(rates) != len(lats):
            raise ValueError(f"uplink_rate={list(rates)} and uplink_latency={list(lats)}: "
                             "give one value per link, the same number (N >= 1) for both")
        for i, r in enumerate(rates):
            _positive(f"uplink_rate[{i}]", r)
        for i, v in enumerate(lats):
            _positive(f"uplink_latency[{i}]", v, allow_zero=True)
        object.__setattr__(self, "step_time", float(self.step_time))
        object.__setattr__(self, "uplink_rate", rates)
        object.__setattr__(self, "uplink_latency", lats)

    @property
    def N(self) -> int:
        return len(self.uplink_rate)


@dataclass(frozen=True)
class RoundTimeParts:
    """Modelled time of one global round: compute plus one entry per link."""

    compute: float
    comm: tuple[float, ...]

    @property
    def total(self) -> float:
        return self.compute + sum(self.comm)


def message_bits(model_dim: int, codecs: Sequence[Codec]) -> list[int]:
    """Bits of ONE uplink message on each link: ``8 * codec.nbytes(model_dim)``."""
    _check_dim(model_dim)
    return [8 * int(c.nbytes(int(model_dim))) for c in codecs]


def round_time_parts(model_dim: int, tau: Sequence[int], codecs: Sequence[Codec],
                     tree: Tree | None, latency: LatencyModel) -> RoundTimeParts:
    """``compute = K t_step``; ``comm[n-1] = prod(tau_{n+1..N}) (bits_n / R_n + lat_n)``.

    Children of a node send in parallel, so one aggregation on link ``n`` costs
    one message time however many children there are; the ``prod(tau_{n+1..N})``
    aggregations of a round happen one after another.  ``tree`` only fixes ``N``
    (pass ``None`` to skip the check).
    """
    N = latency.N if tree is None else tree.N
    t = _int_list("tau", tau, N, 1)
    if len(codecs) != N or latency.N != N:
        raise ValueError(f"{len(codecs)} codecs and latency with {latency.N} links: "
                         f"the tree has N={N} links, give {N} of each")
    bits = message_bits(model_dim, codecs)
    comm = tuple(aggregations_per_round(t, n) * (bits[n - 1] / latency.uplink_rate[n - 1]
                                                 + latency.uplink_latency[n - 1]) for n in range(1, N + 1))
    return RoundTimeParts(math.prod(t) * latency.step_time, comm)


def round_time(model_dim: int, tau: Sequence[int], codecs: Sequence[Codec],
               tree: Tree | None, latency: LatencyModel) -> float:
    """Modelled seconds of one global round (see :func:`round_time_parts`)."""
    return round_time_parts(model_dim, tau, codecs, tree, latency).total
