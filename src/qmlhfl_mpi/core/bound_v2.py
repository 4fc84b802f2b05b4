"""Bound v2 (docs/theory.md section 17), pure: the drift measured around the devices' weighted mean, layer by
layer and inside each layer's own window.

For a node ``u`` of layer ``n`` and its children ``c``, the spread of the devices around the virtual mean splits
exactly (law of total variance over the nested tree) into ``Gamma = sum_n V_n``, ``V_n = sum_u sum_c P_c ||xbar_c
- xbar_u||^2``.  ``xbar_c`` and ``xbar_u`` are equal after every layer-``n`` aggregation, so ``V_n`` grows only
inside a layer-``n`` window of ``T_n`` steps.  Per round (``x = L mu``, ``c = 2`` with heterogeneous data, 1 for
IID; ``lambda_n > 0`` free, chosen for the whole bound):

* ``W_n = T_n (T_n - 1) / 2``: layer ``n``'s window drift coefficient (``W_N = K (K - 1) / 2``);
* ``Q_n = sum_{m<n} q_m alpha_m T_m Pi_{m-1} (T_n - T_m)``: the quantization noise of the layers below ``n``
  that lives inside a layer-``n`` window (a node's noise weighs ``P_v^2 / P_u' <= P_v``: nesting, no factor 2);
* ``S_{n-1} = sum_i p_i^2 / P_{c(i)}`` (``c(i)`` the device's layer-``(n-1)`` ancestor): the SGD noise that
  separates siblings (1 for ``n = 1``);
* ``G = sum_n (1 + 1/lambda_n) Q_n``, ``R = sum_n (1 + 1/lambda_n) S_{n-1} (T_n - 1) / 2``,
  ``theta = c x^2 (sum_n (1 + lambda_n) W_n + G)``;
* condition: ``theta < 1`` and ``1 - A x - x^2 G (1 + c x C_eps) / (1 - theta) > 0`` (``A = 1 + C_eps``);
* rate: ``2 gap0 / (mu T K) + x sigma^2 S2 + x C_eps (sigma^2 + 2 zeta^2)
  + x^2 (1 + c x C_eps) / (1 - theta) [2 sum_n (1 + lambda_n) W_n zeta_n^2 + G (2 zeta^2 + sigma^2) + sigma^2 R]``
  with ``zeta^2 = sum_n zeta_n^2``.

With one layer, no quantization and full gradients (``sigma = 0``) the rate is the old bound's (section 7), term
for term; the condition is weaker (the old one also pays for the drift's gradient norms).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .golden import golden_section
from .topology import Tree

__all__ = ["V2Terms", "V2Bound", "v2_terms", "bound_v2", "max_lr_v2", "noise_shares"]


def noise_shares(tree: Tree, samples: np.ndarray | None = None) -> tuple[float, ...]:
    """``S_{n-1} = sum_i p_i^2 / P_{c_{n-1}(i)}`` for ``n = 1..N`` (device weights, or sample weights)."""
    per_dev = np.ones(tree.num_devices) if samples is None else np.asarray(samples, dtype=np.float64).reshape(-1)
    p = per_dev / per_dev.sum()
    cum = np.concatenate([[0.0], np.cumsum(p)])
    out = []
    for m in range(tree.N):  # layer m = n - 1
        st = tree.starts[m]
        P = cum[st[1:]] - cum[st[:-1]]                          # P_c per layer-m node
        owner = np.searchsorted(st, np.arange(tree.num_devices), side="right") - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(float(np.sum(np.where(P[owner] > 0, p * p / np.where(P[owner] > 0, P[owner], 1.0), 0.0))))
    return tuple(out)


@dataclass(frozen=True)
class V2Terms:
    """Per layer ``n = 1..N`` (index ``n - 1``): ``W``, ``Q``, ``S`` (``S_{n-1}``) and ``T_n``; ``C_eps`` and
    ``S2`` as in the old bound."""

    W: tuple[float, ...]
    Q: tuple[float, ...]
    S: tuple[float, ...]
    T: tuple[int, ...]
    C_eps: float
    s2: float


def v2_terms(tau: Sequence[int], qs: Sequence[float], alpha: Sequence[float], beta: Sequence[float],
             shares: Sequence[float], s2: float) -> V2Terms:
    """The coefficients for iteration counts ``tau`` and per-link ``qs``; ``alpha``, ``beta``, ``s2`` are the old
    bound's tree constants (:func:`~.theory.tree_constants`), ``shares`` :func:`noise_shares`."""
    N = len(tau)
    if not (len(qs) == len(alpha) == len(beta) == len(shares) == N):
        raise ValueError(f"tau {list(tau)}, qs {list(qs)}: one entry per link of the N = {N} layers each")
    T = [1]
    for t in tau:
        T.append(T[-1] * int(t))
    pi = [1.0]
    for n in range(1, N + 1):
        pi.append(pi[-1] * (1.0 + qs[n - 1] * alpha[n - 1]))
    W = tuple(T[n] * (T[n] - 1) / 2.0 for n in range(1, N + 1))
    Q = tuple(sum(qs[m - 1] * alpha[m - 1] * T[m] * pi[m - 1] * (T[n] - T[m]) for m in range(1, n))
              for n in range(1, N + 1))
    C_eps = sum(qs[m - 1] * beta[m - 1] * T[m] * pi[m - 1] for m in range(1, N + 1))
    return V2Terms(W, Q, tuple(float(s) for s in shares), tuple(T[1:]), float(C_eps), float(s2))


@dataclass(frozen=True)
class V2Bound:
    """Bound v2's value and its additive terms at step size ``mu`` with the multipliers ``lam`` it chose."""

    optimisation: float     # 2 gap0 / (mu T K)
    sampling: float         # x sigma^2 S2
    quant_noise: float      # x C_eps (sigma^2 + 2 zeta^2)
    drift_layers: tuple[float, ...]  # per layer: x^2 (1 + c x C_eps)/(1 - theta) 2 (1 + lam_n) W_n zeta_n^2
    drift_noise: float      # x^2 (1 + c x C_eps)/(1 - theta) [G (2 zeta^2 + sigma^2) + sigma^2 R]
    lam: tuple[float, ...]
    admissible: bool

    @property
    def total(self) -> float:
        if not self.admissible:
            return math.inf
        return self.optimisation + self.sampling + self.quant_noise + sum(self.drift_layers) + self.drift_noise

    def shares(self) -> dict[str, float]:
        """Each term's share of the total (empty when not admissible)."""
        tot = self.total
        if not math.isfinite(tot) or tot <= 0:
            return {}
        parts = {"optimisation": self.optimisation, "sampling": self.sampling, "quant_noise": self.quant_noise,
                 **{f"drift_{n}": d for n, d in enumerate(self.drift_layers, start=1)},
                 "drift_noise": self.drift_noise}
        return {k: v / tot for k, v in parts.items()}


def _split(t: V2Terms, lam: Sequence[float]) -> tuple[float, float, float]:
    """``sum (1 + lam_n) W_n``, ``G`` and ``R`` (a layer whose noise part is not zero needs ``lam_n > 0``)."""
    w = sum((1.0 + lam_n) * W for lam_n, W in zip(lam, t.W))
    G = R = 0.0
    for lam_n, Q, S, T in zip(lam, t.Q, t.S, t.T):
        inv = 1.0 + 1.0 / lam_n if lam_n > 0 else math.inf
        if Q:
            G += inv * Q
        if T > 1:
            R += inv * S * (T - 1) / 2.0
    return w, G, R


def _evaluate(t: V2Terms, x: float, mu: float, T: int, sigma2: float, gap0: float, zeta2: Sequence[float],
              lam: Sequence[float]) -> V2Bound:
    c = 2.0 if any(zeta2) else 1.0
    w, G, R = _split(t, lam)
    theta = c * x * x * (w + G)
    K = t.T[-1]
    z = float(sum(zeta2))
    ok = theta < 1.0
    factor = x * x * (1.0 + c * x * t.C_eps) / (1.0 - theta) if ok else math.inf
    ok = ok and 1.0 - (1.0 + t.C_eps) * x - x * x * G * (1.0 + c * x * t.C_eps) / (1.0 - theta) > 0
    layers = tuple(factor * 2.0 * (1.0 + lam_n) * W * zn if zn else 0.0 for lam_n, W, zn in zip(lam, t.W, zeta2))
    noise = factor * (G * (2.0 * z + sigma2) + (sigma2 * R if sigma2 else 0.0)) if (G or sigma2) else 0.0
    return V2Bound(2.0 * gap0 / (mu * T * K), x * sigma2 * t.s2, x * t.C_eps * (sigma2 + 2.0 * z), layers, noise,
                   tuple(lam), bool(ok))


def _needs_lambda(t: V2Terms, sigma2: float) -> list[bool]:
    """Whether layer ``n`` has a noise part to split off (quantization below it, or SGD noise and ``T_n > 1``)."""
    return [bool(Q) or (sigma2 > 0 and T > 1) for Q, T in zip(t.Q, t.T)]


def _search(f, lam: list[float], free: list[bool], sweeps: int = 6) -> list[float]:  # type: ignore[no-untyped-def]
    """Coordinate-wise golden-section search of ``f(lam)`` over ``log lam_n`` in ``[-12, 12]`` for the free
    ``n`` (a few sweeps: the objective is smooth and unimodal in each coordinate where it is finite)."""
    for _ in range(sweeps):
        for n, is_free in enumerate(free):
            if not is_free:
                continue

            def at(s: float, n: int = n) -> float:
                trial = list(lam)
                trial[n] = math.exp(s)
                return f(trial)

            a, b = golden_section(at, -12.0, 12.0, 1e-11)
            lam[n] = math.exp((a + b) / 2.0)
    return lam


def bound_v2(T: int, mu: float, L: float, t: V2Terms, sigma2: float, gap0: float, zeta2: Sequence[float],
             lam: Sequence[float] | None = None) -> V2Bound:
    """Bound v2 on ``(1/(T K)) sum E||grad f(y)||^2`` after ``T`` rounds at step ``mu``; ``zeta2`` per layer (A3',
    docs/theory.md section 15).  ``lam`` given: those multipliers; else the ones that minimise the whole bound
    (a layer without a noise part takes 0)."""
    if not (T >= 1 and mu > 0 and L > 0 and sigma2 >= 0 and gap0 >= 0 and len(zeta2) == len(t.W)
            and all(z >= 0 for z in zeta2)):
        raise ValueError(f"bound_v2: T={T!r}, mu={mu!r}, L={L!r}, sigma2={sigma2!r}, gap0={gap0!r}, "
                         f"zeta2={list(zeta2)!r}: expected T >= 1, mu, L > 0, the rest >= 0, one zeta2 per layer")
    x = L * mu
    if lam is not None:
        return _evaluate(t, x, mu, T, sigma2, gap0, zeta2, lam)
    free = _needs_lambda(t, sigma2)
    c = 2.0 if any(zeta2) else 1.0

    def objective(lm: list[float]) -> float:  # the bound where admissible, else far above it by the violation
        b = _evaluate(t, x, mu, T, sigma2, gap0, zeta2, lm)
        return b.total if b.admissible else 1e300 * (1.0 + min(_violation(t, x, lm, c), 1e6))

    best = _search(objective, [1.0 if f else 0.0 for f in free], free)
    return _evaluate(t, x, mu, T, sigma2, gap0, zeta2, best)


def _violation(t: V2Terms, x: float, lam: Sequence[float], c: float) -> float:
    """How far the multipliers ``lam`` are from satisfying the condition at ``x`` (<= 0: satisfied)."""
    w, G, _ = _split(t, lam)
    theta = c * x * x * (w + G)
    if theta >= 1.0:
        return 1.0 + theta
    return -(1.0 - (1.0 + t.C_eps) * x - x * x * G * (1.0 + c * x * t.C_eps) / (1.0 - theta))


def max_lr_v2(L: float, t: V2Terms, sigma2: float, heterogeneous: bool, tol: float = 1e-10) -> float:
    """The largest step (to ``tol`` relative) for which some multipliers satisfy bound v2's condition."""
    zeta = [1.0 if heterogeneous else 0.0] * len(t.W)

    def ok(mu: float) -> bool:
        x = L * mu
        free = _needs_lambda(t, sigma2)

        c = 2.0 if heterogeneous else 1.0
        best = _search(lambda lm: _violation(t, x, lm, c), [1.0 if f else 0.0 for f in free], free, sweeps=3)
        return _evaluate(t, x, mu, 1, sigma2, 0.0, zeta, best).admissible

    lo, hi = 0.0, 1.0 / L
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
