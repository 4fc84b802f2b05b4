"""ADMM at the edges (docs/algorithms.md, "ADMM"), pure: the per-device arithmetic of FedADMM (Gong, Li and
Freris, "FedADMM: A Robust Federated Deep Learning Framework with Adaptivity to System Heterogeneity", ICDE 2022)
with the edge servers as its servers.

Device ``i`` of an edge whose model is ``v`` keeps a dual vector ``y_i`` (zero at first).  In each local run it
minimises the augmented Lagrangian ``f_i(x) + <y_i, x - v> + rho/2 ||x - v||^2`` inexactly by the run's SGD steps
from ``v``, whose gradient is ``grad f_i(x) + rho (x - z_i)`` with the anchor ``z_i = v - y_i / rho``: FedProx's
term with ``mu = rho`` toward ``z_i``.  Then

    y_i <- y_i + rho (x_i - v),        x^_i = x_i + y_i / rho,

and ``x^_i`` is what the device sends (as ``x^_i - v`` through the link's codec).  The edge averages the
augmented models, ``v <- sum_i a_i x^_i`` (its server step as for any message).  A device that does not take part
keeps its dual.  All in float32, in this order, on the host (the serial reference repeats it).

At a higher layer ``L`` the children are subtrees (docs/algorithms.md, "ADMM above the edges"): child ``c`` of a
layer-``L`` node with model ``v`` keeps ``y_c``; every device of ``c``'s subtree adds ``rho (x - z_c)`` to its
gradients, ``z_c = v - y_c / rho``, throughout the node's aggregation period (the subtree minimises
``f_c(x) + <y_c, x - v> + rho/2 ||x - v||^2`` by its own hierarchical SGD); then ``c`` takes the same dual step
with its model ``x_c`` and sends ``x_c + y_c / rho``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Admm"]


@dataclass(frozen=True)
class Admm:
    """The penalty ``rho`` > 0 and the ``layer`` whose nodes run ADMM with their children (1: the edges)."""

    rho: float
    layer: int = 1

    def __post_init__(self) -> None:
        if not self.rho > 0:
            raise ValueError(f"admm.rho = {self.rho!r}: must be > 0")
        if self.layer < 1:
            raise ValueError(f"admm.layer = {self.layer!r}: must be >= 1")

    def anchor(self, v: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """The local run's proximal anchor ``z = v - y / rho`` (``v`` without a dual yet)."""
        v = np.asarray(v, dtype=np.float32)
        return v.copy() if y is None else v - y * np.float32(1.0 / self.rho)

    def step(self, x: np.ndarray, v: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """After the local run from ``v`` to ``x``: the new dual ``y + rho (x - v)`` and the augmented model
        ``x + y_new / rho`` the device sends."""
        x, v = np.asarray(x, dtype=np.float32), np.asarray(v, dtype=np.float32)
        d = np.float32(self.rho) * (x - v)
        y_new = d if y is None else y + d
        return y_new, x + y_new * np.float32(1.0 / self.rho)
