"""Server optimisers: how a node turns the decoded update into its new model (pure numpy).

At an aggregation of node ``u`` (layer ``n``) with participants ``c`` the
decoded weighted update is ``g = sum_c a(c) Q(x_c - v)`` (float32); the node's
optimiser makes the new model from ``v`` and ``g``, with per-node state that
the engine keeps on the node's leader and checkpoints.  All arithmetic is
float32 elementwise in a fixed order, so every rank that computes it gets
the same bits.

* ``avg`` (today's rule, the default): ``v + g`` (``server.lr`` is ignored).
* ``momentum`` (FedAvgM, Hsu et al. 2019): ``m = beta m + g``; ``v + lr m``.
* ``adam`` (FedAdam, Reddi et al. 2021, Algorithm 2, no bias correction):
  ``m = b1 m + (1 - b1) g``; ``s = b2 s + (1 - b2) g^2``; ``v + lr m / (sqrt(s) + eps)``.
* ``yogi`` (FedYogi, ibid.): as adam with ``s = s - (1 - b2) g^2 sign(s - g^2)``.

State starts at zero (``m = 0``, ``s = 0``); ``eps`` plays the role of
Reddi et al.'s ``tau`` (the adaptivity floor), default 1e-3.

The vectors are those of the aggregation's backend (:mod:`.vectors`): numpy
arrays, or torch tensors on the training device.  The rules are written for
both: element-wise operators with the vector on the left and the
coefficients as Python floats already rounded to float32 (numpy and torch
both apply such a scalar in float32), and :func:`sqrt` / :func:`sign`, which
give the same bits for either kind (this module imports no torch: tensors are
recognised by their methods).

To add one: a :class:`ServerOptimizer` subclass and a factory
``f(lr=, momentum=, betas=, eps=) -> ServerOptimizer`` (keywords it may
leave to their defaults) registered in
:data:`SERVER_OPTIMIZERS` (or named as ``module:attr`` in ``server.optimizer``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .registry import PluginError, Registry

__all__ = ["SERVER_OPTIMIZERS", "ServerOptimizer", "make_server_optimizer"]

SERVER_OPTIMIZERS = Registry("server optimizer", "server.optimizer")
SERVER_OPTIMIZERS.register("avg", "qmlhfl_mpi.core.server_opt:Average", "v + g: the paper's weighted average (default)")
SERVER_OPTIMIZERS.register("momentum", "qmlhfl_mpi.core.server_opt:Momentum",
                           "FedAvgM: m = beta m + g, v + lr m (server.lr, server.momentum)")
SERVER_OPTIMIZERS.register("adam", "qmlhfl_mpi.core.server_opt:Adam",
                           "FedAdam: v + lr m / (sqrt(s) + eps) (server.lr, server.betas, server.eps)")
SERVER_OPTIMIZERS.register("yogi", "qmlhfl_mpi.core.server_opt:Yogi",
                           "FedYogi: FedAdam with Yogi's additive second moment (server.lr, server.betas, server.eps)")


def f32(x: float) -> float:
    """``x`` rounded to float32, as a Python float: applied in float32 by numpy and torch alike."""
    return float(np.float32(x))


def sqrt(x: Any) -> Any:
    """The correctly rounded float32 square root of a numpy array or a torch tensor (torch's vectorised
    CPU ``sqrt`` is not correctly rounded: the tensor's float64 root is rounded to float32, which is)."""
    if isinstance(x, np.ndarray):
        return np.sqrt(x)
    return x.double().sqrt().float()


def sign(x: Any) -> Any:
    """``-1, 0, +1`` per element, ``nan`` for ``nan`` (numpy's rule; torch's ``sign`` gives 0 for nan)."""
    if isinstance(x, np.ndarray):
        return np.sign(x)
    return x.sign().where(~x.isnan(), x)


class ServerOptimizer(ABC):
    """One layer's server optimiser.  ``state_names`` lists the per-node float32 vectors it keeps."""

    state_names: tuple[str, ...] = ()

    @property
    @abstractmethod
    def name(self) -> str:
        """Short description for logs and results, e.g. ``adam(lr=0.01, ...)``."""

    @abstractmethod
    def apply(self, v: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        """The new model from ``v`` and the update ``g`` (both float32); updates ``state`` in place."""

    def init_state(self, d: int) -> dict[str, np.ndarray]:
        return {k: np.zeros(d, dtype=np.float32) for k in self.state_names}


@dataclass(frozen=True)
class Average(ServerOptimizer):
    lr: float = 1.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-3

    @property
    def name(self) -> str:
        return "avg"

    def apply(self, v: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        return v + g


def _check(name: str, lr: float, lo: float, hi: float, value: float, what: str) -> None:
    if not lr > 0:
        raise ValueError(f"server optimizer {name!r}: server.lr = {lr!r} must be > 0")
    if not lo <= value < hi:
        raise ValueError(f"server optimizer {name!r}: {what} = {value!r} out of range: expected {lo} <= value < {hi}")


@dataclass(frozen=True)
class Momentum(ServerOptimizer):
    lr: float = 1.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-3
    state_names = ("m",)

    def __post_init__(self) -> None:
        _check("momentum", self.lr, 0.0, 1.0, self.momentum, "server.momentum")

    @property
    def name(self) -> str:
        return f"momentum(lr={self.lr:g}, beta={self.momentum:g})"

    def apply(self, v: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        m = state["m"]
        m *= f32(self.momentum)
        m += g
        return v + m * f32(self.lr)


@dataclass(frozen=True)
class Adam(ServerOptimizer):
    lr: float = 0.01
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-3
    state_names = ("m", "s")

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ValueError(f"server optimizer {self.kind!r}: server.betas = {list(self.betas)} must be [b1, b2]")
        for i, b in enumerate(self.betas):
            _check(self.kind, self.lr, 0.0, 1.0, b, f"server.betas[{i}]")
        if not self.eps > 0:
            raise ValueError(f"server optimizer {self.kind!r}: server.eps = {self.eps!r} must be > 0")

    kind = "adam"

    @property
    def name(self) -> str:
        return f"{self.kind}(lr={self.lr:g}, betas=({self.betas[0]:g}, {self.betas[1]:g}), eps={self.eps:g})"

    def _second(self, s: np.ndarray, g2: np.ndarray) -> None:
        b2 = np.float32(self.betas[1])
        s *= float(b2)
        s += g2 * float(np.float32(1) - b2)

    def apply(self, v: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        m, s = state["m"], state["s"]
        b1 = np.float32(self.betas[0])
        m *= float(b1)
        m += g * float(np.float32(1) - b1)
        self._second(s, g * g)
        return v + (m * f32(self.lr)) / (sqrt(s) + f32(self.eps))


@dataclass(frozen=True)
class Yogi(Adam):
    kind = "yogi"

    def _second(self, s: np.ndarray, g2: np.ndarray) -> None:
        s -= (g2 * float(np.float32(1) - np.float32(self.betas[1]))) * sign(s - g2)


def make_server_optimizer(kind: str, **params: float | Sequence[float]) -> ServerOptimizer:
    """The optimiser ``kind`` (a registered name or a plug-in reference) with the parameters
    given (``lr``, ``momentum``, ``betas``, ``eps``; the optimiser's defaults for the others)."""
    factory = SERVER_OPTIMIZERS.resolve(kind)
    if not callable(factory):
        raise PluginError(f"server.optimizer {kind!r}: {factory!r} is not callable")
    try:
        opt = factory(**params)
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001 - anything a plug-in raises
        raise PluginError(f"server.optimizer {kind!r}: {e}") from None
    if not isinstance(opt, ServerOptimizer):
        raise PluginError(f"server.optimizer {kind!r} gave {type(opt).__name__}; subclass "
                          "qmlhfl_mpi.core.server_opt.ServerOptimizer")
    return opt
