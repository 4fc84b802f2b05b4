"""Local SGD on a flat float32 parameter vector (not collective).

The model's parameters are views into one flat ``float32`` buffer, so the
boundary to the aggregation code is a single numpy vector with no copies of
individual tensors.

The client optimiser (:class:`ClientOptimizer`) follows ``torch.optim.SGD``
(dampening 0) plus the FedProx proximal term.  With ``w`` the parameters,
``w0`` the start vector of this local run, ``lr`` the run's learning rate
(:class:`~qmlhfl_mpi.core.schedule.LRSchedule` at the global round, or the fixed
``lr``), each step computes, in float32 and in this order, one torch
elementwise op per line (coefficients are Python floats that torch rounds to
float32 inside the kernel; a term whose coefficient is 0 is skipped, not
added as zero):

  1. ``g = grad + weight_decay * w``         ``add(grad, w, alpha=weight_decay)``
  2. ``d = w - w0``;  ``g = g + prox_mu * d``  ``sub(w, w0)``, ``add_(g, d, alpha=prox_mu)``
  3. momentum > 0: first step of the run ``buf = g`` (a copy), later steps
     ``buf = momentum * buf`` then ``buf = buf + g`` (``mul_``, ``add_``);
     then ``g = g + momentum * buf`` (nesterov, ``add_(g, buf, alpha=momentum)``) or ``g = buf``
  4. ``w = w - lr * g``                      ``add_(w, g, alpha=-lr)``

Steps 1, 3 and 4 are exactly the ops of ``torch.optim.SGD`` (its foreach and
single-tensor paths agree on CPU), so without ``prox_mu`` a run equals it bit
for bit.  The ops are ``torch._foreach_*`` over the parameter tensors, a fixed
sequence independent of the rank, so every rank computes the same bits for a
device.  With all options off the step is today's plain
``_foreach_add_(w, grad, alpha=-lr)`` and nothing else.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core import rng
from ..core.schedule import LRSchedule


@dataclass(frozen=True)
class ClientOptimizer:
    """Options of the local (client) optimiser; all off is plain SGD.

    ``momentum`` in [0, 1) (heavy ball, dampening 0); ``nesterov`` needs ``momentum > 0``;
    ``weight_decay`` >= 0 (L2, added to the gradient as in ``torch.optim.SGD``); ``prox_mu`` >= 0
    (FedProx: ``prox_mu * (w - w0)`` added to the gradient, ``w0`` the start vector of the local
    run).  Momentum buffers live for one local run only: they start at the first step's gradient
    and are dropped when the run returns its vector (FedAvg with local momentum; nothing
    optimiser-side is aggregated or carried from round to round).
    """

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        for name in ("momentum", "weight_decay", "prox_mu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} = {value!r}: must be a finite number")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum = {self.momentum!r}: must be in [0, 1)")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov = {self.nesterov!r}: must be true or false")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov = True needs momentum > 0 (momentum = 0)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay = {self.weight_decay!r}: must be >= 0")
        if self.prox_mu < 0:
            raise ValueError(f"prox_mu = {self.prox_mu!r}: must be >= 0")

    @property
    def is_plain(self) -> bool:
        """No momentum, weight decay or proximal term: the plain SGD step."""
        return self.momentum == 0 and not self.nesterov and self.weight_decay == 0 and self.prox_mu == 0


PLAIN = ClientOptimizer()


class LocalTrainer:
    """SGD (batch size ``batch_size``) with the options ``opt`` on one rank's model.

    The learning rate of a local run in global round ``t`` is ``schedule.at(t)`` when a
    ``schedule`` is given (it replaces ``lr``), else ``lr``.  One instance serves all devices a
    rank hosts: :meth:`train` loads the start vector, takes the steps and returns the new vector.
    """

    def __init__(self, model: torch.nn.Module, lr: float, batch_size: int, seed: int,
                 device: torch.device | str = "cpu", opt: ClientOptimizer | None = None,
                 schedule: LRSchedule | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.opt = PLAIN if opt is None else opt
        self.schedule = schedule
        self.params: list[torch.Tensor] = [p for p in self.model.parameters()]
        self.dim = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        off = 0
        for p in self.params:
            n = p.numel()
            self.flat[off : off + n].copy_(p.data.reshape(-1))
            p.data = self.flat[off : off + n].view_as(p)
            off += n
        # the optimiser's state, allocated on first use as flat buffers with per-parameter views
        self._w0: list[torch.Tensor] | None = None   # start vector of the run (prox_mu)
        self._buf: list[torch.Tensor] | None = None  # momentum buffers

    def lr_at(self, round_: int) -> float:
        """The learning rate of a local run in global round ``round_``."""
        return self.lr if self.schedule is None else self.schedule.at(round_)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, off = [], 0
        for p in self.params:
            out.append(flat[off : off + p.numel()].view_as(p))
            off += p.numel()
        return out

    def get_vector(self) -> np.ndarray:
        return self.flat.cpu().numpy().copy()

    def set_vector(self, v: np.ndarray | torch.Tensor) -> None:
        """Load the flat vector ``v``: a host array, or a tensor (on the trainer's device: no host copy)."""
        if isinstance(v, torch.Tensor):
            self.flat.copy_(v.reshape(-1))
        else:
            self.flat.copy_(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)))

    def result(self, like: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """The current vector as the kind of ``like``: a host copy, or a tensor copy on the device."""
        return self.flat.clone() if isinstance(like, torch.Tensor) else self.get_vector()

    def _batches(self, n: int, steps: int, g: np.random.Generator) -> np.ndarray:
        """Indices for ``steps`` minibatches: consecutive slices of fresh permutations."""
        b = min(self.batch_size, n)
        need = steps * b
        perms = [g.permutation(n) for _ in range(-(-need // n))]
        return np.concatenate(perms)[:need].reshape(steps, b)

    def train(self, v: np.ndarray | torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int,
              device: int, round_: int, call: int, prox: tuple[float, np.ndarray] | None = None
              ) -> tuple[Any, float]:
        """``steps`` SGD steps from ``v`` on ``(x, y)`` at the learning rate of round ``round_``;
        returns (new vector, sum of step losses).  The new vector is of ``v``'s kind: a host array
        for an array, a tensor on the trainer's device for a tensor (the aggregation's backend).

        Minibatches come from the stream ``(seed, BATCH, device, round, call)``.
        Randomness inside the model's forward (dropout) comes from torch's
        default generator, which is seeded from ``(seed, FORWARD, device,
        round, call)`` for this call and restored afterwards, so it too does
        not depend on the rank that trains the device.

        ``prox = (mu, anchor)``: the proximal term ``mu (w - anchor)`` instead of the client optimiser's
        (ADMM's local problem, :mod:`qmlhfl_mpi.core.admm`).
        """
        self.set_vector(v)
        idx = torch.from_numpy(self._batches(len(y), steps, rng.stream(self.seed, rng.BATCH, device, round_, call)))
        idx = idx.to(self.device)
        forward_seed = int(rng.stream(self.seed, rng.FORWARD, device, round_, call).integers(2**63))
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.random.default_generator.manual_seed(forward_seed)
            if devices:
                torch.cuda.manual_seed(forward_seed)
            lr = self.lr_at(round_)
            opt, anchor = self.opt, None
            if prox is not None:
                opt = dataclasses.replace(opt, prox_mu=float(prox[0]))
                anchor = torch.from_numpy(np.ascontiguousarray(prox[1], dtype=np.float32)).to(self.device)
            if opt.is_plain:
                loss_sum = self._steps(x, y, idx, steps, lr)
            else:
                loss_sum = self._steps_opt(x, y, idx, steps, lr, opt, anchor)
        return self.result(v), loss_sum

    def _steps(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, steps: int, lr: float) -> float:
        """Plain SGD: ``w -= lr * grad``, one ``_foreach_add_`` per step."""
        loss_sum = 0.0
        model, params = self.model, self.params
        model.train()
        for s in range(steps):
            bi = idx[s]
            for p in params:
                p.grad = None
            loss = loss_fn(model(x[bi]), y[bi])
            loss.backward()
            with torch.no_grad():
                # every parameter has a grad after backward()
                torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)  # type: ignore[misc]
            loss_sum += float(loss.detach())
        return loss_sum

    def _steps_opt(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, steps: int, lr: float,
                   opt: ClientOptimizer, anchor: torch.Tensor | None = None) -> float:
        """SGD with momentum / nesterov / weight decay / proximal term: the ops of the module
        docstring, in its order; the proximal term toward ``anchor`` (flat), else the run's start."""
        model, params = self.model, self.params
        mu, m = opt.prox_mu, opt.momentum
        w0 = bufs = None
        if mu != 0:
            if self._w0 is None:
                self._w0 = self._views(torch.empty_like(self.flat))
            w0 = self._w0
            torch._foreach_copy_(w0, params if anchor is None else self._views(anchor))
        if m != 0:
            if self._buf is None:
                self._buf = self._views(torch.empty_like(self.flat))
            bufs = self._buf
        loss_sum = 0.0
        model.train()
        for s in range(steps):
            bi = idx[s]
            for p in params:
                p.grad = None
            loss = loss_fn(model(x[bi]), y[bi])
            loss.backward()
            with torch.no_grad():
                client_step(opt, params, [p.grad for p in params], w0, bufs, s == 0, lr)  # type: ignore[misc]
            loss_sum += float(loss.detach())
        return loss_sum

    @torch.no_grad()
    def evaluate(self, v: np.ndarray | torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 chunks: Sequence[tuple[int, int, int]], num_chunks: int, batch: int = 2048) -> np.ndarray:
        """Model ``v`` on the test chunks ``(chunk id, start, stop)`` of ``(x, y)``:
        a ``(num_chunks, 3)`` array of (sum of losses, correct predictions, samples),
        zero for chunks not given.  No correct predictions for regression targets."""
        self.set_vector(v)
        self.model.eval()
        out = np.zeros((num_chunks, 3))
        for cid, lo, hi in chunks:
            loss_sum, correct = 0.0, 0
            for i in range(lo, hi, batch):
                # a fresh copy: the kernels' rounding may depend on where a slice starts in memory,
                # and a chunk's offset in this rank's test block depends on the rank count
                xb = x[i : min(hi, i + batch)].clone(memory_format=torch.contiguous_format)
                pred, target = self.model(xb), y[i : min(hi, i + batch)]
                loss_sum += float(loss_fn(pred, target, reduction="sum"))
                if not target.is_floating_point():
                    correct += int((pred.argmax(1) == target).sum())
            out[cid] = (loss_sum, correct, hi - lo)
        return out


def client_step(opt: ClientOptimizer, params: list[torch.Tensor], grads: list[torch.Tensor],
                w0: list[torch.Tensor] | None, bufs: list[torch.Tensor] | None, first: bool, lr: float
                ) -> list[torch.Tensor] | None:
    """One step of ``opt`` on ``params`` in place (the rule and float32 order of the module docstring),
    shared by the one-device and the batched trainers.  ``w0``: the run's start (when ``prox_mu``);
    ``bufs``: the momentum buffers, ``None`` until the first step allocates them (or given, and then
    overwritten on the ``first`` step).  Returns the buffers.  ``grads`` may be modified."""
    wd, mu, m = opt.weight_decay, opt.prox_mu, opt.momentum
    g: list[torch.Tensor] | tuple[torch.Tensor, ...] = grads
    if wd != 0:
        g = torch._foreach_add(g, params, alpha=wd)
    if w0 is not None:
        torch._foreach_add_(g, torch._foreach_sub(params, w0), alpha=mu)
    if m != 0:
        if bufs is None:
            bufs = [t.clone() for t in g]
        elif first:
            torch._foreach_copy_(bufs, g)
        else:
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, g)
        if opt.nesterov:
            torch._foreach_add_(g, bufs, alpha=m)
        else:
            g = bufs
    torch._foreach_add_(params, g, alpha=-lr)
    return bufs


def loss_fn(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy for class labels; ``0.5 (out - y)^2`` for float targets (least squares)."""
    if y.is_floating_point():
        return 0.5 * F.mse_loss(out.squeeze(-1), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)
