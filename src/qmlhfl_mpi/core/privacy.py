"""Client-level differential privacy (docs/privacy.md), pure: the mechanism's numbers and the accountant.

DP-FedAvg (McMahan et al., ICLR 2018) placed in the hierarchy.  Every device's update from a local run,
``x - v``, is clipped to L2 norm ``C`` before its codec.  Gaussian noise is added at one layer ``L``:

* ``local`` (``L = 0``): each device adds ``N(0, (sigma C)^2 I)`` to its clipped update;
* ``edge`` (``1 <= L < N``) and ``central`` (``L = N``): each layer-``L`` node adds
  ``N(0, (sigma C kappa omega)^2 I)`` to the weighted sum of its children's messages, before its server
  step; ``kappa`` is the link-1 codec's norm factor (:meth:`~.codecs.base.Codec.norm_factor`) and ``omega`` the
  largest weight a participating device has in that sum (:func:`largest_device_weight`).

**Neighbouring relation: replace one device's data** (the relation of our sampler, fixed-size sampling
without replacement).  A device changes the noised sum by at most ``2 C kappa omega``, so every noised
release is a Gaussian mechanism of noise multiplier ``sigma / 2`` with respect to that sensitivity; the
accountant (Google's ``dp-accounting``, RDP) composes, per round, ``prod(tau_{L+1..N})`` such releases per
device (``prod(tau_{2..N})`` local runs for ``local``, without amplification: each device's messages are
seen), each amplified by the device's edge sampling ``m`` of ``C_e`` (sampled without replacement), the
worst edge size counted.  Sampling above the edges, availability and dropped children only lower a device's
participation and are not counted (a valid upper bound).

``distributed`` (layer 1, with secure aggregation on link 1): every device adds a discrete Gaussian share to its
integer codes (:mod:`.ddgauss`), of std ``sigma Delta / sqrt(t)`` in code units, ``Delta = omega C gamma + sqrt(d')``
the most one device's rounded codes can weigh and ``t`` = ``privacy.secure_threshold`` the fewest shares a sum
the edge sees can hold (a group with fewer survivors aborts).  The edge sees the masked sum only; the accountant
composes Kairouz et al.'s bound for a sum of ``t`` discrete Gaussians at L2 sensitivity over std ``2 / sigma``
(replace-one), amplified by the edge sampling with Wang et al.'s general bound (:func:`.ddgauss.sampled_wor_rdp`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import rng
from .ddgauss import ORDERS, ddg_rdp, ddg_tau, discrete_gaussian, sampled_wor_rdp
from .plan import RoundPlan
from .topology import aggregations_per_round

__all__ = ["PLACEMENTS", "Accountant", "Mechanism", "clip_scale", "largest_device_weight"]


@functools.lru_cache(maxsize=64)
def _round_rdp(sigma: float, releases: int, edges: tuple[tuple[int, int], ...], shares: tuple[int, int] = (0, 0)
               ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """One round's RDP per edge class, with its orders, in one or more ways (the smallest epsilon counts; computed
    once per process: the sampled mechanism's takes ~0.2 s); ``shares = (d', t)``: the distributed discrete
    Gaussian in ``d'`` codes, ``t`` shares at the fewest.
    A sample's RDP is never above the unsampled mechanism's (Renyi divergence is jointly quasi-convex), so the
    smaller of the two counts: the amplification bounds are loose when most devices take part."""
    from dp_accounting import rdp

    default = np.array(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)
    out = []
    if shares[1]:
        d, t = shares
        tau = ddg_tau(sigma * math.sqrt(d / t), t)  # the smallest share's std in code units: Delta >= sqrt(d')

        def one(alpha: float) -> float:
            return ddg_rdp(alpha, 2.0 / sigma, tau, d)

        for n, m in edges:  # any order unsampled; sampled, Wang et al.'s bound at integer orders as well
            ways = [(default, releases * np.array([one(a) for a in default]))]
            if m < n:
                ways.append((np.array(ORDERS, dtype=np.float64),
                             releases * np.array([sampled_wor_rdp(a, m / n, one) for a in ORDERS])))
            out.append(ways)
        return out
    import dp_accounting as dpa

    for n, m in edges:
        one_event = dpa.GaussianDpEvent(sigma / 2.0)
        curves = []
        for event in (one_event, dpa.SampledWithoutReplacementDpEvent(n, m, one_event)) if m < n else (one_event,):
            acc = rdp.RdpAccountant(default, neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
            acc.compose(dpa.SelfComposedDpEvent(event, releases))
            curves.append(np.array(acc.rdp, dtype=np.float64))
        out.append([(default, np.minimum.reduce(curves))])
    return out

PLACEMENTS = {"local": "every device adds noise to its clipped update (trusts nobody)",
              "distributed": "every device adds a discrete Gaussian share to its masked integer codes; the edge sees "
                             "only the noised sum (trusts nobody; needs secure aggregation on layer 1)",
              "edge": "every node of privacy.layer adds noise to its children's weighted sum (trusts that layer)",
              "central": "the cloud adds noise to its children's weighted sum (trusts the cloud)"}


def clip_scale(norm: float, clip: float) -> np.float32:
    """The factor ``min(1, C / ||x - v||)`` that clips an update of norm ``norm`` to ``clip``, in float32."""
    return np.float32(1.0 if norm <= clip else clip / norm)


def largest_device_weight(plan: RoundPlan, i: int) -> float:
    """The largest product of weights from aggregation ``i`` down to a participating device (its weight in
    ``i``'s sum), over the plan's nested aggregations (one per child: the layers between aggregate once)."""
    aggs = plan.aggregations
    below = {(b.parent, b.slot): j for j, b in enumerate(aggs) if b.parent >= 0}  # one pass over the plan

    def largest(k: int) -> float:
        a = aggs[k]
        if a.layer == 1:
            return float(np.max(a.weights)) if len(a.weights) else 0.0
        return max((float(w) * largest(below[(k, s)]) for s, w in enumerate(a.weights) if (k, s) in below),
                   default=0.0)

    return largest(i)


@dataclass(frozen=True)
class Mechanism:
    """The mechanism of a run: clip ``C``, noise multiplier ``sigma``, noise layer ``layer`` (0: local) and
    the link-1 codec's norm factor ``kappa`` (1 when ``layer`` is 0: the noise goes in before the codec);
    ``shares`` > 0: distributed, the devices' discrete Gaussian shares add up to the noise in any ``shares`` of
    them (``layer`` 1)."""

    clip: float
    sigma: float
    layer: int
    kappa: float
    seed: int
    shares: int = 0
    quantile: float = 0.0   # adaptive clipping (Andrew et al. 2021): the target quantile; 0 = a fixed clip
    clip_lr: float = 0.0    # its geometric step
    count_std: float = 0.0  # the noise every noise-adding party adds to its count of updates within the clip

    @property
    def update_sigma(self) -> float:
        """The update's noise multiplier: ``sigma``, or with adaptive clipping ``(sigma^-2 - (2 sigma_b)^-2)^-1/2``,
        so that the update and the count together cost what noise ``sigma`` alone does (Andrew et al., Thm 1)."""
        if not self.quantile or not self.sigma:
            return self.sigma
        return 1.0 / math.sqrt(self.sigma ** -2 - (2.0 * self.count_std) ** -2)

    def local_std(self, clip: float) -> float:
        """A device's noise's standard deviation under clip ``clip`` (local placement)."""
        return self.update_sigma * clip

    def node_std(self, omega: float, clip: float) -> float:
        """The noise's standard deviation at a layer-``layer`` node whose largest device weight is ``omega``."""
        return self.update_sigma * clip * self.kappa * omega

    def count_noise(self, plan: RoundPlan) -> float:
        """Adaptive clipping: the sum of the round's noise on the count of updates within the clip, one draw of
        ``N(0, sigma_b^2)`` per noise-adding party (a device's local run, or an aggregation of the noise layer),
        keyed like its noise, added up exactly (``math.fsum``: the same in any order)."""
        if not self.count_std:
            return 0.0
        keys: list[tuple[int, ...]] = []
        for a in plan.aggregations:
            if self.layer == 0 and a.layer == 1:
                keys += [(0, int(c), plan.round, int(k)) for c, k in zip(a.children, a.train_calls)]
            elif self.layer == a.layer and self.layer and not a.empty:  # (an empty one adds no noise)
                keys.append((a.layer, a.node, plan.round, a.call))
        return math.fsum(float(rng.generator((self.seed, rng.CLIPCOUNT, *k)).standard_normal()) * self.count_std
                         for k in keys)

    def next_clip(self, clip: float, within: int, total: int, noise: float) -> tuple[float, float]:
        """Adaptive clipping after a round: ``(C', b)`` with ``b = (within + noise) / total`` the noised fraction of
        the round's ``total`` updates within ``clip`` and ``C' = clip exp(-clip_lr (b - quantile))`` (``clip``
        and NaN when no update was clipped this round)."""
        if not total:
            return clip, math.nan
        b = (within + noise) / total
        return clip * math.exp(-self.clip_lr * (b - self.quantile)), b

    def share_std(self, omega: float, gamma: float, d: int) -> float:
        """Distributed: a device's share's std in code units, ``sigma (omega C gamma + sqrt(d)) / sqrt(shares)``,
        for the largest device weight ``omega``, the codec's scale ``gamma`` and ``d`` codes."""
        return self.sigma * (omega * self.clip * gamma + math.sqrt(d)) / math.sqrt(self.shares)

    def discrete_noise(self, d: int, key: Sequence[int], std: float) -> np.ndarray:
        """``N_Z(0, std^2)`` per code (int64) from the stream ``(seed, NOISE, *key)``."""
        return discrete_gaussian(rng.generator((self.seed, rng.NOISE, *key)), std, d)

    def noise(self, d: int, key: Sequence[int], std: float) -> np.ndarray:
        """``N(0, std^2 I)`` in float32 from the stream ``(seed, NOISE, *key)``."""
        z = rng.generator((self.seed, rng.NOISE, *key)).standard_normal(d, dtype=np.float32)
        z *= np.float32(std)
        return z


@dataclass(frozen=True)
class Accountant:
    """Epsilon after ``t`` rounds at ``delta`` for a mechanism of noise multiplier ``sigma`` at layer
    ``layer``: ``releases`` noised releases per device per round, each amplified by sampling ``m`` of ``n``
    at the device's edge, for every ``(n, m)`` in ``edges`` (the worst counts); ``shares = (d', t)`` for the
    distributed discrete Gaussian (``(0, 0)``: Gaussian)."""

    sigma: float
    releases: int
    edges: tuple[tuple[int, int], ...]
    delta: float
    shares: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, sigma: float, layer: int, tau: Sequence[int], edges: Sequence[tuple[int, int]],
           delta: float, shares: tuple[int, int] = (0, 0)) -> Accountant:
        """The accountant of a run: ``tau`` the iteration counts, ``edges`` every edge's ``(devices, sampled)``."""
        releases = aggregations_per_round(tau, max(layer, 1))  # an edge's local runs a round, or a layer-L sum
        pairs = tuple(sorted({(1, 1)} if layer == 0 else {(int(n), int(m)) for n, m in edges}))
        return cls(float(sigma), int(releases), pairs, float(delta), (int(shares[0]), int(shares[1])))

    @cached_property
    def _rdp(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per edge class, the RDP orders and one round's RDP (``dp-accounting``, replace-one; distributed:
        :mod:`.ddgauss`)."""
        return _round_rdp(self.sigma, self.releases, self.edges, self.shares)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds (``inf`` without noise, 0 after no round)."""
        if rounds <= 0:
            return 0.0
        if self.sigma <= 0:
            return math.inf
        from dp_accounting import rdp

        return max(min(float(rdp.rdp_privacy_accountant.compute_epsilon(orders, rounds * r, self.delta)[0])
                       for orders, r in ways) for ways in self._rdp)

    def epsilons(self, rounds: int) -> np.ndarray:
        """Epsilon after 1, 2, ..., ``rounds`` rounds (float64)."""
        return np.array([self.epsilon(t) for t in range(1, rounds + 1)], dtype=np.float64)

    def rounds_within(self, target: float, limit: int) -> int:
        """The most rounds (up to ``limit``) whose epsilon stays within ``target`` (bisection: epsilon grows
        with the rounds)."""
        lo, hi = 0, limit
        if self.epsilon(limit) <= target:
            return limit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= target else (lo, mid)
        return lo
