"""The devices a rank hosts, as the executor sees them: local runs from a model, one device at a time or in
batches.  Not collective; no MPI.

:class:`~qmlhfl_mpi.core.clients.Clients` is the protocol the round's executor trains through
(:mod:`qmlhfl_mpi.comm.executor`): ``train(v, devices, round, calls, peers)``
yields, for each device in order, its model after ``tau_1`` local steps from
``v``, the sum of its step losses and its step count.  :class:`OneByOne` runs
:meth:`LocalTrainer.train` lazily, device after device (one result in memory
at a time); :class:`Batched` trains the devices of one layer-1 node together
(:class:`~.vectorized.VectorTrainer`, batches laid out by the aggregation's
participants), so both give each device the same bits on any number of ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..core.clients import Clients
from .train import LocalTrainer
from .vectorized import VectorTrainer

__all__ = ["Batched", "Clients", "OneByOne"]

Vec = Any  # a vector of the aggregation's backend: a numpy array, or a torch tensor on the training device
Data = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


class OneByOne:
    """:meth:`LocalTrainer.train` for one device after the other, each when it is asked for."""

    def __init__(self, trainer: LocalTrainer, data: Data, steps: int) -> None:
        self.trainer, self.data, self.steps = trainer, data, steps

    def train(self, v: Vec, devices: Sequence[int], round_: int, calls: Sequence[int], peers: np.ndarray,
              prox: tuple[float, Callable[[int], np.ndarray]] | None = None) -> Iterator[tuple[Vec, float, int]]:
        for dev, call in zip(devices, calls):
            x, y = self.data[dev]
            out, loss_sum = self.trainer.train(v, x, y, self.steps, dev, round_, call,
                                               None if prox is None else (prox[0], prox[1](dev)))
            yield out, loss_sum, self.steps


class Batched:
    """The devices of one layer-1 node trained together (:meth:`VectorTrainer.train_many`)."""

    def __init__(self, trainer: LocalTrainer, data: Data, steps: int) -> None:
        self.batched, self.data, self.steps = VectorTrainer(trainer), data, steps

    def train(self, v: Vec, devices: Sequence[int], round_: int, calls: Sequence[int], peers: np.ndarray,
              prox: tuple[float, Callable[[int], np.ndarray]] | None = None) -> Iterator[tuple[Vec, float, int]]:
        if prox is not None:
            raise ValueError("per-device proximal anchors (ADMM) train one device at a time: train.vectorize off")
        results = self.batched.train_many(v, [self.data[d] for d in devices], self.steps, devices, round_, calls,
                                          peers)
        for x, loss_sum in results:
            yield x, loss_sum, self.steps
