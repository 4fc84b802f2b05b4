"""The distributed discrete Gaussian (DDGauss; Kairouz, Liu and Steinke, ICML 2021), pure: the sampler, the
published privacy bound for a sum of discrete Gaussians, and the amplification of any RDP curve by sampling
without replacement (docs/privacy.md, "Distributed DP").

* :func:`discrete_gaussian` draws ``N_Z(0, sigma^2)`` by the rejection sampler of Canonne, Kamath and Steinke
  (NeurIPS 2020, Algorithm 3): a discrete Laplace proposal of scale ``t = floor(sigma) + 1`` (the difference of
  two geometric variables) accepted with probability ``exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2))``.  It runs in
  float64 arithmetic, as the published implementations do, not in exact rationals.
* :func:`ddg_tau` and :func:`ddg_rdp`: the sum of ``n`` independent ``N_Z(0, sigma^2)`` per coordinate,
  shifted by a vector of L2 norm ``Delta``, has Renyi divergence of order ``alpha`` at most
  ``min(alpha l^2 / 2 + tau d, alpha / 2 (l + sqrt(d) tau)^2)`` with ``l = Delta / (sqrt(n) sigma)`` and
  ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` (Kairouz et al., Theorem 1 and Proposition 14,
  the form without the L1 term).
* :func:`sampled_wor_rdp`: Wang, Balle and Kasiviswanathan (AISTATS 2019), Theorem 9: the RDP of a mechanism
  run on a sample of ``m`` of ``n`` (without replacement, replace-one relation), from its own RDP at integer
  orders (``eps(infinity) = infinity``).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["ORDERS", "ddg_rdp", "ddg_tau", "discrete_gaussian", "sampled_wor_rdp"]

# integer RDP orders the distributed mechanism is accounted at (Theorem 9 takes integer orders)
ORDERS = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256, 384, 512)


def discrete_gaussian(gen: np.random.Generator, sigma: float, size: int) -> np.ndarray:
    """``size`` draws of ``N_Z(0, sigma^2)`` (int64) from ``gen`` (CKS 2020, Algorithm 3); ``sigma`` >= 0."""
    out = np.zeros(size, dtype=np.int64)
    if sigma <= 0 or size == 0:
        return out
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)          # P(a geometric proposal stops): 1 - exp(-1/t)
    todo = np.arange(size)
    while todo.size:
        k = todo.size
        y = (gen.geometric(p, k) - gen.geometric(p, k)).astype(np.int64)  # discrete Laplace, scale t
        accept = gen.random(k) < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2.0 * sigma * sigma))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


def ddg_tau(sigma: float, n: int) -> float:
    """Kairouz et al.'s ``tau``: how far a sum of ``n`` discrete Gaussians of std ``sigma`` is from one."""
    return 10.0 * sum(math.exp(-2.0 * math.pi ** 2 * sigma * sigma * k / (k + 1)) for k in range(1, n))


def ddg_rdp(alpha: float, scale: float, tau: float, d: int) -> float:
    """The bound on the RDP of order ``alpha`` of the sum, ``scale = Delta / (sqrt(n) sigma)`` (L2 sensitivity
    over the sum's std), in ``d`` coordinates."""
    return min(alpha * scale * scale / 2.0 + tau * d, alpha / 2.0 * (scale + math.sqrt(d) * tau) ** 2)


def sampled_wor_rdp(alpha: int, q: float, eps: Callable[[int], float]) -> float:
    """The RDP at integer order ``alpha`` >= 2 of a mechanism with RDP ``eps`` run on a fraction ``q`` = m / n
    sampled without replacement (Wang, Balle and Kasiviswanathan 2019, Theorem 9; never above ``eps(alpha)``)."""
    alpha = int(alpha)
    if q >= 1.0:
        return eps(alpha)
    if q <= 0.0:
        return 0.0
    e2 = eps(2)
    terms = [0.0, 2 * math.log(q) + _log_comb(alpha, 2) + min(math.log(4.0) + e2 + math.log(-math.expm1(-e2)),
                                                               e2 + math.log(2.0))]
    terms += [math.log(2.0) + j * math.log(q) + _log_comb(alpha, j) + (j - 1) * eps(j) for j in range(3, alpha + 1)]
    top = max(terms)
    log_a = top + math.log(sum(math.exp(x - top) for x in terms))
    return min(eps(alpha), log_a / (alpha - 1))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
