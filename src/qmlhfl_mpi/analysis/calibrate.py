"""Calibrating the convergence bound to short pilot runs (`optimize --calibrate`).

The bound of docs/theory.md depends on the smoothness constant ``L`` and the
step ``lr`` only through ``x = L lr`` in its noise and drift terms and in the
learning-rate condition.  At the learning rate that trains, the condition is
usually violated (the admissible lr is 20-60 x too small, docs/theory.md
section 16), so the raw bound cannot rank ``tau`` there.  Calibration puts one
free scale ``c`` on ``L`` in those terms (``L_eff = c L``) and fits it to
pilot runs:

* prediction for a pilot with ``tau`` (``K = prod(tau)`` SGD steps in a round
  of ``rt`` modelled seconds): the descent lemma summed over a round says the
  loss falls by at least ``lr K (G - P_c(tau)) / 2`` per round, with ``G`` the
  squared gradient norm and ``P_c`` the bound's noise + drift terms at
  ``L_eff = c L``; per modelled second that is
  ``rate(tau; c) = lr K (G0 - P_c(tau)) / (2 rt)``, ``G0`` measured at the
  initial model;
* measurement: ``(train_loss[0] - train_loss[-1]) / ((R - 1) rt)`` of an
  ``R``-round pilot (``train_loss`` is the mean minibatch loss of a round);
* fit: ``c`` minimising the spread of ``log rate(tau; c) - log measured`` over
  the pilots whose loss fell (the relative speeds; the common level depends on
  the gradient norm during the pilots, which ``G0`` only estimates), by a grid then golden-section search over ``log c``
  in ``(0, c_max)``, ``c_max`` the largest scale at which every pilot
  satisfies the learning-rate condition at ``lr``.

The fit and the prediction are pure functions of numbers (testable without a
run); the pilot runner is injected by the command line (analysis does not
import the run layer).
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..config import build as builders
from ..core.golden import golden_section
from ..core.theory import (
    convergence_bound_layers_terms,
    convergence_bound_terms,
    layer_condition_terms,
    lr_condition_B,
    q_per_link,
    round_time,
)
from ..learning.train import loss_fn
from ..results import read_run

__all__ = ["Pilot", "PilotRunner", "BoundModel", "fit_scale", "default_pilot_taus", "run_pilots",
           "initial_gradient_norm2"]

#: runs a config to completion and returns the path of its results file
PilotRunner = Callable[[Config, bool], str]  # (config, resume) -> its results file; runs in this process


@dataclass(frozen=True)
class Pilot:
    """One pilot: ``tau``, its modelled round time and the measured loss decrease per modelled second."""

    tau: tuple[int, ...]
    rounds: int
    round_time: float
    measured: float          # (train_loss[0] - train_loss[-1]) / ((rounds - 1) round_time); may be <= 0
    losses: tuple[float, ...] = ()


@dataclass(frozen=True)
class BoundModel:
    """The bound's constants for predictions at a scale ``c`` (``L_eff = c L``)."""

    L: float
    lr: float
    qs: tuple[float, ...]
    tree: object              # topology.Tree (kept generic: the core functions check it)
    G0: float                 # squared gradient norm at the initial model
    sigma2: float = 1.0
    gap0: float = 1.0
    zeta2: float = 0.0
    zeta2_layers: tuple[float, ...] | None = None

    def B(self, tau: Sequence[int]) -> float:
        """Learning-rate condition coefficient of the bound the optimiser uses."""
        if self.zeta2_layers is not None:
            return layer_condition_terms(tau, self.qs, self.tree).B  # type: ignore[arg-type]
        return lr_condition_B(tau, self.qs, self.tree)  # type: ignore[arg-type]

    def c_max(self, taus: Sequence[Sequence[int]]) -> float:
        """Largest scale with ``1 - (c L lr)^2 B(tau) > 0`` for every ``tau`` (a supremum)."""
        return min(1.0 / (self.L * self.lr * math.sqrt(self.B(t))) for t in taus)

    def penalty(self, tau: Sequence[int], c: float) -> float:
        """Noise + drift terms of the bound at ``L_eff = c L`` (``inf`` when the condition fails)."""
        Le = c * self.L
        if self.zeta2_layers is not None:
            lt = convergence_bound_layers_terms(1, self.lr, Le, tau, self.qs, self.tree,  # type: ignore[arg-type]
                                                self.sigma2, self.gap0, self.zeta2_layers)
            if not lt.condition > 0:
                return math.inf
            return lt.sampling + lt.quant_noise + lt.drift_sigma + sum(lt.drift_layers)
        b = convergence_bound_terms(1, self.lr, Le, tau, self.qs, self.tree,  # type: ignore[arg-type]
                                    self.sigma2, self.gap0, self.zeta2)
        if not b.condition > 0:
            return math.inf
        return b.sampling + b.quant_noise + b.drift

    def rate(self, tau: Sequence[int], rt: float, c: float) -> float:
        """Predicted loss decrease per modelled second, ``lr K (G0 - P_c(tau)) / (2 rt)``."""
        return self.lr * math.prod(tau) * (self.G0 - self.penalty(tau, c)) / (2.0 * rt)


def fit_scale(measured: Sequence[float], predict: Callable[[int, float], float], c_max: float,
              c_min: float | None = None, grid: int = 61, tol: float = 1e-6,
              centred: bool = True) -> tuple[float, float]:
    """Scale ``c`` in ``[c_min, c_max)`` minimising the squared log errors
    ``r_i = log predict(i, c) - log measured[i]``.

    ``centred`` (default, with >= 2 pilots) minimises ``sum_i (r_i - mean r)^2``:
    only the pilots' *relative* speeds are fitted (which is what ranking ``tau``
    needs), not the common level, which depends on the unknown gradient norm
    during the pilots; otherwise ``sum_i r_i^2``.  ``predict(i, c)`` is the
    predicted value of pilot ``i`` at scale ``c``; a prediction ``<= 0`` (or
    non-finite) costs ``1e4`` so that such scales lose.  Pilots with
    ``measured[i] <= 0`` must be left out by the caller.  A log-spaced grid of
    ``grid`` points finds the bracket, golden-section search over ``log c``
    refines it to relative ``tol``.  ``c_min`` defaults to ``1e-6 c_max``.
    Returns ``(c, the minimised sum)``.
    """
    if not measured:
        raise ValueError("no pilot with a falling training loss to fit: raise --pilot-rounds or lower the lr")
    if any(not (math.isfinite(m) and m > 0) for m in measured):
        raise ValueError(f"measured={list(measured)!r}: every value must be a finite decrease > 0")
    if not (math.isfinite(c_max) and c_max > 0):
        raise ValueError(f"c_max={c_max!r} out of range: expected a finite value > 0")
    hi = math.log(c_max) - 1e-9
    lo = math.log(c_min) if c_min is not None else hi - math.log(1e6)
    if not lo < hi:
        raise ValueError(f"c_min={c_min!r} >= c_max={c_max!r}: give c_min < c_max")
    logm = [math.log(m) for m in measured]
    centre = centred and len(logm) >= 2

    def sse(u: float) -> float:
        c = math.exp(u)
        r, bad = [], 0
        for i, lm in enumerate(logm):
            p = predict(i, c)
            if math.isfinite(p) and p > 0:
                r.append(math.log(p) - lm)
            else:
                bad += 1
        if bad:
            return 1e4 * bad
        mean = sum(r) / len(r) if centre else 0.0
        return sum((v - mean) ** 2 for v in r)

    us = np.linspace(lo, hi, grid)
    vals = [sse(float(u)) for u in us]
    k = int(np.argmin(vals))
    a, b = golden_section(sse, float(us[max(k - 1, 0)]), float(us[min(k + 1, grid - 1)]), tol)
    u = (a + b) / 2.0
    best = min([(sse(u), u), (vals[k], float(us[k]))])
    return math.exp(best[1]), best[0]


def default_pilot_taus(tau: Sequence[int], max_tau: int) -> list[tuple[int, ...]]:
    """Up to three splits of the configured ``K = prod(tau)``: all local steps on
    the devices (``(K, 1, .., 1)``: flat-heavy), the configured ``tau`` (balanced)
    and the most frequent edge aggregation (``(1, .., 1, K)``); factors above
    ``max_tau`` are moved to the next layer, duplicates dropped."""
    t = tuple(int(v) for v in tau)
    N, K = len(t), math.prod(t)

    def pack(order: Sequence[int]) -> tuple[int, ...]:
        out = [1] * N
        rest = K
        for n in order:
            f = max(d for d in range(1, min(rest, max_tau) + 1) if rest % d == 0)
            out[n] = f
            rest //= f
        return tuple(out) if rest == 1 else t

    cands = [pack(range(N)), tuple(min(v, max_tau) for v in t), pack(range(N - 1, -1, -1))]
    seen: list[tuple[int, ...]] = []
    for c in cands:
        if c not in seen:
            seen.append(c)
    return seen


def initial_gradient_norm2(cfg: Config, max_devices: int = 8, max_samples: int = 512) -> float:
    """``||grad f(w0)||^2`` of the sample-weighted objective of (at most
    ``max_devices``) devices on at most ``max_samples`` samples each, at the
    initial model (an ESTIMATE of ``G0``)."""
    tree = cfg.build_tree()
    data = builders.local_data(cfg, tree, range(min(tree.num_devices, max_devices)), 0, 1)
    model = builders.model(cfg, data.input_shape, data.num_classes)
    params = list(model.parameters())
    total: torch.Tensor | None = None
    weight = 0.0
    for x, y in data.train.values():
        n = min(len(x), max_samples)
        loss = loss_fn(model(x[:n]), y[:n])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).detach().double() * n
        total = g if total is None else total + g
        weight += n
    if total is None or weight == 0:
        raise ValueError("no training samples on the first devices: cannot estimate the gradient norm")
    return float(((total / weight) ** 2).sum())


def run_pilots(cfg: Config, taus: Sequence[Sequence[int]], rounds: int, runner: PilotRunner,
               workdir: str | Path | None = None) -> list[Pilot]:
    """Run ``cfg`` for ``rounds`` rounds with each ``tau`` (evaluation only at
    the end, no checkpoints) in a temporary directory and measure the
    training-loss decrease per modelled second."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
        raise ValueError(f"--pilot-rounds {rounds!r}: need an integer >= 2 (the decrease is measured "
                         "from the first to the last round)")
    tree = cfg.build_tree()
    dim = builders.model_dim(cfg)
    codecs = builders.codecs(cfg)
    lat = builders.latency(cfg)
    out: list[Pilot] = []
    with tempfile.TemporaryDirectory(prefix="qmlhfl-pilot-", dir=workdir) as tmp:
        for i, tau in enumerate(taus):
            t = tuple(int(v) for v in tau)
            pcfg = dataclasses.replace(
                cfg, tau=t,
                train=dataclasses.replace(cfg.train, rounds=rounds, eval_every=rounds),
                output=dataclasses.replace(cfg.output, path=str(Path(tmp) / f"pilot{i}.h5"), checkpoint_every=0,
                                           csv=False, tensorboard=""))
            metrics = read_run(runner(pcfg, False))["metrics"]
            loss = [float(v) for v in np.asarray(metrics["train_loss"], dtype=np.float64)]
            rt = round_time(dim, t, codecs, tree, lat)
            if len(loss) < 2 or not all(math.isfinite(v) for v in loss):
                meas = math.nan
            else:
                meas = (loss[0] - loss[-1]) / ((len(loss) - 1) * rt)
            out.append(Pilot(t, len(loss), rt, meas, tuple(loss)))
    return out


def qs_of(cfg: Config) -> tuple[float, ...]:
    """Per-link variance factors ``q_n`` of the configured codecs."""
    return tuple(q_per_link(builders.model_dim(cfg), builders.codecs(cfg)))
