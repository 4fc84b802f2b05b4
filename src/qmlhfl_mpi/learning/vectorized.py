"""Many devices' local SGD at once: ``torch.func`` (``functional_call`` + ``grad`` + ``vmap``)
over stacked parameters (not collective).

For small models most of a step is Python and dispatch overhead; stacking the
devices that start from the same model (the local children of one layer-1
node) into one batched computation removes most of it, and the gain shrinks
as the model grows (docs/performance.md, "Batched devices").
``train.vectorize: auto`` therefore batches models below :data:`AUTO_MAX_PARAMS`.

Every device draws its minibatches from the same stream as the unbatched
path, ``(seed, BATCH, device, round, call)``.  Batched products are not
bitwise independent of where in the batch a device sits (kernels take
other paths for other alignments), so batches are laid out by the round's
plan: a device's slot and its batch's size depend only on its place among the
devices that train in the same layer-1 aggregation (its *peers*, the same on
every rank), and slots of peers on other ranks hold dummy data.  Results are
therefore identical for any rank count (tested on 1 to 4 ranks with edges
split over ranks, with and without sampling) and agree with the unbatched
path to float32 round-off.  Because the layout follows the drawn devices, not
the tree, a batch holds only devices that train: with 10 of an edge's 10,000
devices drawn, one batch of 10 (a layout by the tree would train 10 chunks of
64 slots, mostly padding).  Devices with fewer samples than ``batch_size`` train on
the unbatched path.

Which models qualify: any module without data-dependent control flow or
in-place state (the registry's models all do); models with dropout do not
(their randomness is keyed per device call on the unbatched path), and
``vectorize: on`` refuses them with a message.

The client optimiser (:class:`~qmlhfl_mpi.learning.train.ClientOptimizer`) and the
learning-rate schedule are the trainer's: the same update rule and op order
as the unbatched path (see :mod:`qmlhfl_mpi.learning.train`) on stacked
``(G, ...)`` tensors, with per-slot momentum buffers and the common start
vector as ``w0``.  With all options off the step is today's
``params - lr * grads``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..core import rng
from .train import LocalTrainer, client_step, loss_fn

AUTO_MAX_PARAMS = 60_000  # below this, vectorize: auto batches (break-even measured near 90 k)
CHUNK = 64                # devices per batched call; part of the layout (see train_many)


def vectorizable(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained batched, or ``None`` if it can."""
    drop = [name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if drop:
        return (f"it has dropout ({', '.join(drop[:3])}): its randomness is keyed per device on the unbatched "
                "path; set train.vectorize: off")
    return None


def use_vectorized(mode: str, model: nn.Module, num_params: int) -> bool:
    """The ``train.vectorize`` decision: ``on``, ``off``, or ``auto`` (small, qualifying models).
    Raises ``ValueError`` for ``on`` with a model that does not qualify."""
    problem = vectorizable(model)
    if mode == "on" and problem:
        raise ValueError(f"train.vectorize: on, but the model cannot be trained batched: {problem}")
    if mode == "auto":
        return problem is None and num_params < AUTO_MAX_PARAMS
    return mode == "on"


class VectorTrainer:
    """Batched local SGD sharing the model, data layout, streams, optimiser options and learning-rate
    schedule of a :class:`LocalTrainer`."""

    def __init__(self, base: LocalTrainer) -> None:
        self.base = base
        self.names = [n for n, _ in base.model.named_parameters()]
        self.shapes = [p.shape for _, p in base.model.named_parameters()]
        self.sizes = [p.numel() for _, p in base.model.named_parameters()]
        model = base.model

        def loss_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(model, params, (x,)), y)

        self._step = vmap(grad_and_value(loss_one))

    def train_many(self, v: np.ndarray | torch.Tensor, data: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
                   devices: Sequence[int], round_: int, calls: Sequence[int], peers: np.ndarray
                   ) -> list[tuple[Any, float]]:
        """``steps`` SGD steps from ``v`` for every device ``devices[k]`` (all in ``peers``, the devices of
        every rank that train in this layer-1 aggregation, ascending) on ``data[k]``; returns ``(new vector,
        sum of step losses)`` per device, in order, the vectors of ``v``'s kind (host arrays, or tensors on
        the device).

        Batches are laid out by the plan, not by the rank: the device at position ``p`` of ``peers`` always
        sits in slot ``p % CHUNK`` of batch ``p // CHUNK``, whose size is fixed by ``len(peers)`` alone; slots
        of peers another rank hosts get dummy data.  So a device sees the same batched computation on any
        number of ranks.  Devices with fewer samples than the batch size train on the unbatched path.
        """
        base = self.base
        out: list[tuple[Any, float] | None] = [None] * len(devices)
        chunks: dict[int, list[int]] = {}
        peers = np.asarray(peers, dtype=np.int64)
        position = np.searchsorted(peers, np.asarray(devices, dtype=np.int64))
        for k, ((x, y), dev) in enumerate(zip(data, devices)):
            if len(y) < base.batch_size:
                out[k] = base.train(v, x, y, steps, dev, round_, calls[k])
            else:
                if position[k] >= peers.size or peers[position[k]] != dev:
                    raise ValueError(f"device {dev} is not among the aggregation's peers")
                chunks.setdefault(int(position[k]) // CHUNK, []).append(k)
        on_device = isinstance(v, torch.Tensor)
        start = (v.reshape(-1) if isinstance(v, torch.Tensor)
                 else torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))).to(base.device)
        lr = base.lr_at(round_)
        for c, members in chunks.items():
            first = c * CHUNK
            size = min(CHUNK, peers.size - first)
            slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * size
            for k in members:
                x, y = data[k]
                ix = torch.from_numpy(base._batches(len(y), steps, rng.stream(base.seed, rng.BATCH, devices[k],
                                                                                round_, calls[k])))
                slots[int(position[k]) - first] = (x[ix.to(x.device)], y[ix.to(y.device)])
            results = self._train_slots(start, slots, steps, lr, on_device)
            for k in members:
                out[k] = results[int(position[k]) - first]
        return [r for r in out if r is not None]

    def _train_slots(self, start: torch.Tensor, slots: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                     steps: int, lr: float, on_device: bool = False) -> list[tuple[Any, float]]:
        """One batched run at learning rate ``lr``; ``slots[g]`` holds the ``(steps, b, ...)`` minibatches
        of slot ``g`` or ``None``.  The vectors come back as host arrays, or as tensors (``on_device``)."""
        base, G = self.base, len(slots)
        real = next(s for s in slots if s is not None)
        dummy = (torch.zeros_like(real[0]), torch.zeros_like(real[1]))
        xs = torch.stack([s[0] if s is not None else dummy[0] for s in slots]).to(base.device)  # (G, steps, b, ...)
        ys = torch.stack([s[1] if s is not None else dummy[1] for s in slots]).to(base.device)
        params: dict[str, torch.Tensor] = {}
        off = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            params[name] = start[off : off + size].view(shape).unsqueeze(0).expand(G, *shape).clone()
            off += size
        sums = [0.0] * G
        base.model.train()
        if base.opt.is_plain:
            for s in range(steps):
                grads, losses = self._step(params, xs[:, s], ys[:, s])
                with torch.no_grad():
                    params = {n: params[n] - lr * grads[n] for n in self.names}
                for k, value in enumerate(losses.detach().cpu().tolist()):
                    sums[k] += value
        else:
            self._steps_opt(params, xs, ys, steps, lr, sums)
        flat = torch.cat([params[n].reshape(G, -1) for n in self.names], dim=1).detach()
        if on_device:
            return [(flat[k].clone(), sums[k]) for k in range(G)]
        host = flat.cpu().numpy()
        return [(host[k].copy(), sums[k]) for k in range(G)]

    def _steps_opt(self, params: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor, steps: int, lr: float,
                   sums: list[float]) -> None:
        """The optimiser's steps on the stacked ``params`` (updated in place), adding each slot's step
        losses to ``sums``: the ops of :meth:`LocalTrainer._steps_opt`, in its order, per slot."""
        opt = self.base.opt
        mu = opt.prox_mu
        w = [params[n] for n in self.names]
        w0 = [t.clone() for t in w] if mu != 0 else None  # every slot starts from the same vector
        bufs: list[torch.Tensor] | None = None
        for s in range(steps):
            grads, losses = self._step(params, xs[:, s], ys[:, s])
            with torch.no_grad():
                bufs = client_step(opt, w, [grads[n] for n in self.names], w0, bufs, s == 0, lr)
            for k, value in enumerate(losses.detach().cpu().tolist()):
                sums[k] += value
