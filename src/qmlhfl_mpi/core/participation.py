"""Who takes part in an aggregation: per-layer sampling and availability (pure numpy).

At every aggregation of node ``u`` of layer ``n`` (its ``call``-th in global
round ``t``) with ``C`` children:

1. **Sampling.**  ``m = max(1, round_half_up(f_n * C))`` children are drawn
   without replacement from the stream ``(seed, SAMPLE, n, u, t, call)``
   (all ``C`` of them when ``f_n = 1``, with no draw at all).
2. **Availability.**  Every child ``j`` is up with probability ``p_n``,
   independently: ``U_j < p_n`` with ``U_0 .. U_{C-1}`` the first ``C``
   uniforms of ``(seed, AVAIL, n, u, t, call)`` (no draw when ``p_n = 1``).
   A drawn child that is down sends nothing (a straggler or a failed server).

The participants are the drawn children that are up, in child order.  Every
rank computes the same set from the same key, so which rank hosts which
child never changes it.  Weights among the participants (``a(c)``):

* ``renormalize``: ``D(c) / sum over participants of D``;
* ``unbiased``: ``D(c) / D(u) / pi`` with the inclusion probability
  ``pi = (m / C) * p_n``, so that ``E[sum a(c) x_c] = sum D(c)/D(u) x_c``.

``D`` is the node size of ``topology.weighting`` (devices or samples).  With
``f_n = p_n = 1`` both rules give today's ``D(c) / D(u)`` bit for bit.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from . import rng
from .topology import Tree, aggregations_per_round, messages_per_round

WEIGHTINGS = ("renormalize", "unbiased")


@functools.lru_cache(maxsize=4096)
def sample_size(fraction: float, children: int) -> int:
    """``max(1, round_half_up(fraction * children))`` (at most ``children``), computed exactly
    on the fraction's shortest decimal form (as ``topk`` counts its ``k``)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"participation fraction {fraction!r} out of range: expected 0 < f <= 1")
    if children <= 0:
        return 0
    exact = Fraction(repr(float(fraction)))  # the decimal as written: 0.29 * 50 is 14.5, rounded up to 15
    return min(children, max(1, math.floor(exact * children + Fraction(1, 2))))


@dataclass(frozen=True)
class Participation:
    """Per-layer sampling fractions ``f_1..f_N``, availabilities ``p_1..p_N`` and the weighting."""

    fraction: tuple[float, ...]
    availability: tuple[float, ...]
    weighting: str = "renormalize"

    def __post_init__(self) -> None:
        if len(self.fraction) != len(self.availability):
            raise ValueError(f"fraction {list(self.fraction)} and availability {list(self.availability)}: "
                             "give one value per layer each")
        for name, vals in (("fraction", self.fraction), ("availability", self.availability)):
            for i, f in enumerate(vals):
                if not 0.0 < f <= 1.0:
                    raise ValueError(f"participation.{name}[{i}] = {f!r} out of range: expected 0 < value <= 1")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"participation.weighting = {self.weighting!r}: expected one of {WEIGHTINGS}")

    @classmethod
    def full(cls, N: int) -> Participation:
        return cls((1.0,) * N, (1.0,) * N)

    @property
    def is_full(self) -> bool:
        return all(f == 1.0 for f in self.fraction) and all(p == 1.0 for p in self.availability)

    def layer_is_full(self, n: int) -> bool:
        return self.fraction[n - 1] == 1.0 and self.availability[n - 1] == 1.0

    def participants(self, seed: int, n: int, u: int, round_: int, call: int, children: int) -> np.ndarray:
        """Positions (0-based, ascending) of the children of ``u`` that take part in this aggregation."""
        f, p = self.fraction[n - 1], self.availability[n - 1]
        if f < 1.0:
            m = sample_size(f, children)
            drawn = np.sort(rng.stream(seed, rng.SAMPLE, n, u, round_, call).choice(children, size=m, replace=False))
        else:
            drawn = np.arange(children)
        if p < 1.0:
            up = rng.stream(seed, rng.AVAIL, n, u, round_, call).random(children) < p
            drawn = drawn[up[drawn]]
        return drawn.astype(np.int64)

    def weights(self, n: int, sizes: Sequence[float] | np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """Float32 weights of the children at positions ``chosen``, from the children's sizes ``D(c)``."""
        sizes = np.asarray(sizes, dtype=np.float64)
        return self.weights_of(n, sizes[chosen], float(sizes.sum()), len(sizes))

    def weights_of(self, n: int, chosen_sizes: np.ndarray, total: float, children: int) -> np.ndarray:
        """:meth:`weights` from the participants' sizes, the node's size ``D(u)`` (the sum over all its
        ``children``) and their number: the cost follows the participants, not the children."""
        if self.weighting == "unbiased" and not self.layer_is_full(n):
            pi = sample_size(self.fraction[n - 1], children) / children * self.availability[n - 1]
            return (chosen_sizes / total / pi).astype(np.float32)
        part = chosen_sizes.sum()
        if part <= 0:  # the participants hold no samples: they add nothing (the node keeps its model)
            return np.zeros(len(chosen_sizes), dtype=np.float32)
        return (chosen_sizes / part).astype(np.float32)

    def expected_messages(self, n: int, children: int) -> float:
        """Expected number of layer-``n`` children that send per aggregation of a node with ``children``."""
        return sample_size(self.fraction[n - 1], children) * self.availability[n - 1] if children else 0.0


def inclusion(part: Participation, n: int, children: int) -> float:
    """Probability that a given child of a layer-``n`` node with ``children`` children sends in one
    of the node's aggregations: ``(m / C) * p_n``."""
    if children <= 0:
        return 0.0
    return sample_size(part.fraction[n - 1], children) / children * part.availability[n - 1]


def expected_messages(tree: Tree, tau: Sequence[int], n: int, part: Participation | None) -> float:
    """Expected uplink messages over link ``n`` in one global round: for every layer-``(n-1)``
    node, ``prod(tau_{n+1..N})`` times its own and its ancestors' inclusion probabilities
    (the exact count :func:`~.topology.messages_per_round` when everyone takes part).  Vectorised over the
    nodes of each layer (a million devices take milliseconds)."""
    if part is None or part.is_full:
        return float(messages_per_round(tree, tau, n))
    prob = np.ones(1)  # the inclusion probability of every node of layer m (the cloud: 1)
    for m in range(tree.N, n - 1, -1):  # down to layer n-1: each child takes its parent's times its own
        starts = tree.starts[m - 1]
        kid_bounds = np.searchsorted(starts, tree.starts[m])  # node u's children: kid_bounds[u]..kid_bounds[u+1]
        counts = np.diff(kid_bounds)
        sizes, inverse = np.unique(counts, return_inverse=True)
        own = np.array([inclusion(part, m, int(c)) for c in sizes])[inverse.reshape(-1)]
        prob = np.repeat(prob * own, counts)
    return float(prob.sum()) * aggregations_per_round(tau, n)
