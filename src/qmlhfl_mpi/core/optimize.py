"""Deadline optimisation of the iteration counts ``tau_1..tau_N`` (pure math).

Given a wall-clock deadline ``T_d`` and the latency model of
:mod:`qmlhfl_mpi.theory`, a configuration ``tau`` gets
``T = floor(T_d / T_round(tau))`` global rounds; it is *feasible* when
``1 <= tau_n <= max_tau``, ``T >= 1`` and the configured learning rate
satisfies the learning-rate condition ``1 - L^2 lr^2 B(tau) > 0``.  The
objective is the convergence bound after those ``T`` rounds
(:func:`theory.convergence_bound`), to be minimised; with per-layer
heterogeneity constants ``zeta2_layers`` it is the per-layer bound
(:func:`theory.convergence_bound_layers`, docs/theory.md section 15).

The search is exact branch and bound over ``tau_1, tau_2, ...`` in order:

* the bound's noise/drift terms, ``B`` and ``T_round`` never decrease when any
  ``tau_n`` grows, so a prefix completed with ones gives lower bounds on those
  terms, and a prefix that is already infeasible (or whose noise/drift alone
  reaches the incumbent) ends the loop over that ``tau_j``;
* ``T K <= T_d / (t_step + sum_n c_n / T_n)`` with ``c_n`` the cost of one
  aggregation on link ``n`` and ``T_n = tau_1...tau_n``, which grows with every
  ``tau``; bounding the unassigned ``T_n`` from above (by ``max_tau`` powers and
  by the largest ``K`` the learning-rate condition and the deadline allow) bounds
  the ``2 gap0 / (lr T K)`` term from below.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .codecs import Codec
from .theory import (
    BoundTerms,
    LatencyModel,
    LayerBoundTerms,
    TreeConstants,
    _bound,
    _bound_layers,
    _layer_terms,
    _terms,
    _zeta_layers,
    message_bits,
    q_per_link,
    tree_constants,
)
from .topology import Tree

__all__ = ["OptimResult", "optimize_tau", "random_feasible"]

MAX_TAU_LIMIT = 10_000
_GRID_SIZE = 1 << 20  # the last layers are scored all at once with numpy, up to this many


@dataclass(frozen=True)
class OptimResult:
    """Best ``tau`` under the deadline and how random feasible choices compare."""

    tau: tuple[int, ...]
    objective: float          # convergence bound after T rounds (smaller is better)
    T: int                    # global rounds that fit the deadline
    round_time: float         # modelled seconds per round
    steps: int                # T * prod(tau): SGD steps per device
    B: float                  # learning-rate condition coefficient at tau
    max_lr: float             # 1 / (L sqrt(B)) at tau
    nodes: int                # configurations evaluated by the search
    random_objectives: tuple[float, ...]  # objectives of the random feasible draws

    @property
    def random_best(self) -> float:
        return min(self.random_objectives, default=math.nan)

    @property
    def random_median(self) -> float:
        return float(np.median(self.random_objectives)) if self.random_objectives else math.nan

    @property
    def random_worst(self) -> float:
        return max(self.random_objectives, default=math.nan)

    @property
    def beaten_fraction(self) -> float:
        """Fraction of random draws whose objective is >= the optimum (1.0 ideally)."""
        r = self.random_objectives
        return sum(o >= self.objective for o in r) / len(r) if r else math.nan

    @property
    def median_gain(self) -> float:
        """Random median objective divided by the optimum (> 1 means better)."""
        return self.random_median / self.objective


class _Problem:
    """Precomputed constants and a scalar evaluation shared by search and sampling."""

    def __init__(self, model_dim: int, codecs: Sequence[Codec], tree: Tree,
                 latency: LatencyModel, deadline: float, L: float, lr: float, max_tau: int,
                 sigma2: float, gap0: float, zeta2: float, samples: np.ndarray | None, iid: bool,
                 zeta2_layers: Sequence[float] | None = None) -> None:
        if not isinstance(tree, Tree):
            raise ValueError(f"tree={tree!r}: expected a topology.Tree")
        N = tree.N
        if len(codecs) != N or latency.N != N:
            raise ValueError(f"{len(codecs)} codecs and latency with {latency.N} links: "
                             f"the tree has N={N} links, give {N} of each")
        for name, v in (("deadline", deadline), ("L", L), ("lr", lr)):
            if not (math.isfinite(float(v)) and float(v) > 0):
                raise ValueError(f"{name}={v!r} out of range: expected a finite value > 0")
        for name, v in (("sigma2", sigma2), ("gap0", gap0), ("zeta2", zeta2)):
            if not (math.isfinite(float(v)) and float(v) >= 0):
                raise ValueError(f"{name}={v!r} out of range: expected a finite value >= 0")
        if (isinstance(max_tau, bool) or not isinstance(max_tau, (int, np.integer))
                or not 1 <= max_tau <= MAX_TAU_LIMIT):
            raise ValueError(f"max_tau={max_tau!r} out of range: expected an integer 1 <= max_tau <= {MAX_TAU_LIMIT}")
        if iid and zeta2 != 0:
            raise ValueError(f"zeta2={zeta2!r} with iid=True: identical data means zeta2 = 0")
        self.N, self.max_tau = N, int(max_tau)
        self.qs = q_per_link(model_dim, codecs)
        self.consts: TreeConstants = tree_constants(tree, samples)
        bits = message_bits(model_dim, codecs)
        self.cost = [bits[n] / latency.uplink_rate[n] + latency.uplink_latency[n] for n in range(N)]
        self.step = latency.step_time
        if self.step == 0 and all(c == 0 for c in self.cost):
            raise ValueError("latency model gives rounds of zero seconds: set step_time or link costs > 0")
        self.deadline, self.L, self.lr = float(deadline), float(L), float(lr)
        self.sigma2, self.gap0, self.zeta2, self.iid = float(sigma2), float(gap0), float(zeta2), iid
        self.layers: tuple[float, ...] | None = None
        if zeta2_layers is not None:
            if zeta2 != 0:
                raise ValueError(f"zeta2={zeta2!r} and zeta2_layers={list(zeta2_layers)!r}: give one of them")
            self.layers = _zeta_layers(zeta2_layers, N, iid)
        self.evals = 0
        self._grids: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def round_time(self, tau: Sequence[int]) -> float:
        # same arithmetic, in the same order, as theory.round_time_parts(...).total
        comm = tuple(math.prod(tau[n:]) * self.cost[n - 1] for n in range(1, self.N + 1))
        return math.prod(tau) * self.step + sum(comm)

    def evaluate(self, tau: Sequence[int]) -> tuple[float, float, int, float]:
        """``(objective, penalty, T, round_time)``; objective ``inf`` when infeasible,
        penalty = objective without the ``2 gap0/(lr T K)`` term (``inf`` when the
        learning-rate condition fails)."""
        self.evals += 1
        tau = tuple(int(t) for t in tau)
        rt = self.round_time(tau)
        T = math.floor(self.deadline / rt) if rt > 0 else 0
        b: BoundTerms | LayerBoundTerms
        if self.layers is None:
            b = _bound(max(T, 1), self.lr, self.L, _terms(tau, self.qs, self.consts, self.iid), self.consts.s2,
                       math.prod(tau), self.sigma2, self.gap0, self.zeta2, self.iid)
        else:
            b = _bound_layers(max(T, 1), self.lr, self.L, _layer_terms(tau, self.qs, self.consts, self.iid),
                              self.consts.s2, math.prod(tau), self.sigma2, self.gap0, self.layers, self.iid)
        if not b.condition > 0:
            return math.inf, math.inf, T, rt
        penalty = b.sampling + b.quant_noise + b.drift
        return (b.total if T >= 1 else math.inf), penalty, T, rt

    def grid_candidates(self, prefix: Sequence[int], best: float) -> list[tuple[int, ...]]:
        """Completions of ``prefix`` over all ``max_tau^r`` values of the last ``r``
        layers, evaluated with numpy; those within ``1e-9`` (relative) of beating
        ``best``, best first (the caller re-scores them with :meth:`evaluate`)."""
        N, M, j = self.N, self.max_tau, len(prefix)
        r = N - j
        if r not in self._grids:  # all completions, sorted by their product
            axes = np.indices((M,) * r, dtype=np.int64).reshape(r, -1) + 1  # (r, M^r)
            prod = axes.prod(axis=0)
            order = np.argsort(prod, kind="stable")
            self._grids[r] = (np.ascontiguousarray(axes[:, order]), prod[order])
        axes, prod = self._grids[r]
        axes = axes[:, : int(np.searchsorted(prod, self.k_cap() // math.prod(prefix), side="right"))]
        self.evals += axes.shape[1]
        T0 = [np.int64(1)]
        for n in range(1, N + 1):
            T0.append(T0[-1] * (prefix[n - 1] if n <= j else axes[n - 1 - j]))
        T = [np.broadcast_to(np.asarray(t, dtype=np.int64), axes.shape[1:]) for t in T0]
        K = T[N]
        Tf = [t.astype(np.float64) for t in T]
        qs, al, be, x = self.qs, self.consts.alpha, self.consts.beta, self.L * self.lr
        pi = [1.0]
        for n in range(1, N + 1):
            pi.append(pi[-1] * (1.0 + qs[n - 1] * al[n - 1]))
        ce = sum(qs[m - 1] * be[m - 1] * Tf[m] * pi[m - 1] for m in range(1, N + 1))
        het: float | np.ndarray = 0.0
        if self.layers is None:
            bg = sum(pi[m] * (Tf[m + 1] * (Tf[m + 1] - 1) - Tf[m] * (Tf[m] - 1)) / 2.0 for m in range(N))
            noise2 = self.sigma2 if self.iid else self.sigma2 + 2.0 * self.zeta2
            het_noise = noise2
        else:  # same arithmetic as theory._layer_terms / _bound_layers
            Kf = Tf[N]
            k0 = Kf * (Kf - 1) / 2.0
            Q = sum((1.0 if m == N - 1 else 2.0) * qs[m - 1] * al[m - 1] * Tf[m] * pi[m - 1] * (Kf - Tf[m])
                    for m in range(1, N)) + 0.0 * Kf
            with np.errstate(divide="ignore", invalid="ignore"):
                lam = np.where(Q > 0, np.sqrt(Q / np.where(k0 > 0, k0, 1.0)), 0.0)
            bg = k0 + Q + 2.0 * np.sqrt(k0 * Q)
            extra = Q + np.sqrt(Q * k0)
            het = sum(2.0 * ((1.0 + lam) * (Tf[n] - 1) * (2 * Kf - Tf[n]) / 2.0 + extra) * self.layers[n - 1]
                      for n in range(1, N + 1))
            noise2 = self.sigma2
            het_noise = self.sigma2 + 2.0 * sum(self.layers)
        a = 1.0 + ce
        kappa = 1.0 if self.iid else 3.0
        B = ((a + np.sqrt(a * a + 4.0 * kappa * bg)) / 2.0) ** 2
        rt = K.astype(np.float64) * self.step + sum((K // T[n]).astype(np.float64) * self.cost[n - 1]
                                                   for n in range(1, N + 1))
        rounds = np.floor(self.deadline / rt)
        drift: float | np.ndarray
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.iid:
                drift = x * x * bg * noise2
            else:
                theta = 2.0 * x * x * bg
                if self.layers is None:
                    drift = np.where(theta < 1, x * x * bg * (1.0 + 2.0 * x * ce) / (1.0 - theta) * noise2, np.inf)
                else:
                    drift = np.where(theta < 1, x * x * (1.0 + 2.0 * x * ce) / (1.0 - theta) * (bg * noise2 + het),
                                     np.inf)
            obj = (2.0 * self.gap0 / (self.lr * np.maximum(rounds, 1.0) * K) + x * self.sigma2 * self.consts.s2
                   + x * ce * het_noise + drift)
        ok = (1.0 - x * x * B > 0) & (rounds >= 1) & (obj <= best * (1.0 + 1e-9))
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(obj[idx], kind="stable")]
        pre = tuple(int(t) for t in prefix)
        return [pre + tuple(int(v) for v in axes[:, i]) for i in idx]

    def feasible(self, tau: Sequence[int]) -> bool:
        return math.isfinite(self.evaluate(tau)[0])

    def k_cap(self) -> int:
        """Largest K = prod(tau) any feasible tau can have."""
        kappa = 1.0 if self.iid else 3.0
        x2 = (self.L * self.lr) ** 2
        # kappa * B_Gamma * x^2 < 1 and B_Gamma >= K(K-1)/2 (also B_Gamma' of the per-layer bound)
        k_lr = int((1.0 + math.sqrt(1.0 + 8.0 / (kappa * x2))) / 2.0) + 1
        cap = min(k_lr, self.max_tau ** self.N)
        if self.step > 0:
            cap = min(cap, int(self.deadline / self.step) + 1)
        return max(cap, 1)


def _search(p: _Problem) -> tuple[tuple[int, ...], float]:
    N, M = p.N, p.max_tau
    kcap = p.k_cap()
    best_tau = tuple([1] * N)
    best = p.evaluate(best_tau)[0]
    # greedy coordinate descent for a good incumbent
    improved = math.isfinite(best)
    while improved:
        improved = False
        for n in range(N):
            for v in range(1, M + 1):
                cand = best_tau[:n] + (v,) + best_tau[n + 1:]
                obj = p.evaluate(cand)[0]
                if obj < best:
                    best, best_tau, improved = obj, cand, True

    def tk_upper(prefix: list[int]) -> float:
        j = len(prefix)
        T = math.prod(prefix)
        denom = p.step
        Tn = 1
        for n in range(1, N + 1):
            if n <= j:
                Tn = Tn * prefix[n - 1]
                hi = Tn
            else:
                hi = min(T * M ** (n - j), kcap)
            denom += p.cost[n - 1] / hi
        return p.deadline / denom if denom > 0 else math.inf

    grid = 2 if M * M <= _GRID_SIZE else 1

    def rec(prefix: list[int]) -> None:
        nonlocal best, best_tau
        j = len(prefix)
        if N - j <= grid:
            cands = p.grid_candidates(prefix, best)
            for cand in cands:
                obj = p.evaluate(cand)[0]
                if obj < best:
                    best, best_tau = obj, cand
            return
        for v in range(1, M + 1):
            pre = prefix + [v]
            if math.prod(pre) > kcap:
                break
            full = tuple(pre + [1] * (N - j - 1))
            obj, pen, T, rt = p.evaluate(full)
            if not math.isfinite(pen) or T < 1 or pen >= best:
                break  # monotone in v: larger v only makes these worse
            if obj < best:
                best, best_tau = obj, full
            ub = tk_upper(pre)
            lb = pen + (2.0 * p.gap0 / (p.lr * ub) if ub < math.inf else 0.0)
            if lb >= best:
                continue
            rec(pre)

    if math.isfinite(best):
        rec([])
    return best_tau, best


def _check_start(p: _Problem) -> None:
    ones = tuple([1] * p.N)
    obj, pen, T, rt = p.evaluate(ones)
    if not math.isfinite(pen):
        raise ValueError(f"lr={p.lr!r} violates the learning-rate condition even with tau all 1 "
                         f"(1 - L^2 lr^2 B <= 0 with L={p.L!r}): lower the learning rate")
    if T < 1:
        raise ValueError(f"deadline={p.deadline!r} s is shorter than one global round with tau all 1 "
                         f"({rt!r} s): no feasible configuration")


def random_feasible(model_dim: int, codecs: Sequence[Codec], tree: Tree, latency: LatencyModel,
                    deadline: float, L: float, lr: float, max_tau: int = 50, count: int = 1000,
                    seed: int = 0, *, samples: np.ndarray | None = None, iid: bool = False
                    ) -> list[tuple[int, ...]]:
    """``count`` random feasible ``tau`` vectors (duplicates possible).

    Each draw visits the layers in a random order and picks ``tau_n`` uniformly
    among the values that keep the vector feasible with the not-yet-drawn
    layers at 1 (feasibility is monotone, found by bisection).  Randomness comes
    only from ``np.random.default_rng(seed)``.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count={count!r} out of range: expected an integer >= 0")
    p = _Problem(model_dim, codecs, tree, latency, deadline, L, lr, max_tau, 1.0, 1.0, 0.0,
                 samples, iid)
    _check_start(p)
    return _draw(p, int(count), np.random.default_rng(seed))


def _draw(p: _Problem, count: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    out = []
    for _ in range(count):
        tau = [1] * p.N
        for n in rng.permutation(p.N):
            lo, hi = 1, p.max_tau  # lo feasible; find the largest feasible value
            while lo < hi:
                mid = (lo + hi + 1) // 2
                tau[n] = mid
                if p.feasible(tau):
                    lo = mid
                else:
                    hi = mid - 1
            tau[n] = int(rng.integers(1, lo + 1))
        out.append(tuple(tau))
    return out


def optimize_tau(model_dim: int, codecs: Sequence[Codec], tree: Tree, latency: LatencyModel,
                 deadline: float, L: float, lr: float, max_tau: int = 50, sigma2: float = 1.0,
                 gap0: float = 1.0, zeta2: float = 0.0, *, samples: np.ndarray | None = None,
                 iid: bool = False, n_random: int = 1000, seed: int = 0,
                 zeta2_layers: Sequence[float] | None = None) -> OptimResult:
    """Integer ``tau_1..tau_N`` in ``[1, max_tau]`` minimising the convergence bound
    after ``T = floor(deadline / round_time)`` rounds, subject to ``T >= 1`` and the
    learning-rate condition at ``lr``; exact (branch and bound).

    ``sigma2``, ``gap0``, ``zeta2`` are the bound's constants (gradient-noise
    variance, initial optimality gap, heterogeneity).  ``zeta2_layers`` (one
    value per layer, ``zeta2`` then 0) switches to the per-layer bound of
    docs/theory.md section 15; ``B`` and ``max_lr`` are then its condition's.  ``n_random`` feasible
    configurations drawn by :func:`random_feasible` with ``seed`` are scored for
    comparison.  Raises ``ValueError`` when not even ``tau = 1`` is feasible.
    """
    if isinstance(n_random, bool) or not isinstance(n_random, (int, np.integer)) or n_random < 0:
        raise ValueError(f"n_random={n_random!r} out of range: expected an integer >= 0")
    p = _Problem(model_dim, codecs, tree, latency, deadline, L, lr, max_tau, sigma2, gap0, zeta2,
                 samples, iid, zeta2_layers)
    _check_start(p)
    tau, obj = _search(p)
    nodes = p.evals
    rand = [p.evaluate(t)[0] for t in _draw(p, int(n_random), np.random.default_rng(seed))]
    _, _, T, rt = p.evaluate(tau)
    B = (_terms(tau, p.qs, p.consts, iid) if p.layers is None else _layer_terms(tau, p.qs, p.consts, iid)).B
    return OptimResult(tau=tau, objective=obj, T=T, round_time=rt, steps=T * math.prod(tau), B=B,
                       max_lr=1.0 / (p.L * math.sqrt(B)), nodes=nodes, random_objectives=tuple(rand))
