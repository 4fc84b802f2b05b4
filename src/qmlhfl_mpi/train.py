"""Local SGD on a flat float32 parameter vector (not collective).

The model's parameters are views into one flat ``float32`` buffer, so the
boundary to the aggregation code is a single numpy vector with no copies of
individual tensors.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import rng


class LocalTrainer:
    """Plain SGD (learning rate ``lr``, batch size ``batch_size``) on one rank's model.

    One instance serves all devices a rank hosts: :meth:`train` loads the start
    vector, takes the steps and returns the new vector.
    """

    def __init__(self, model: torch.nn.Module, lr: float, batch_size: int, seed: int) -> None:
        self.model = model
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.params = [p for p in model.parameters()]
        self.dim = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(self.dim, dtype=torch.float32)
        off = 0
        for p in self.params:
            n = p.numel()
            self.flat[off : off + n].copy_(p.data.reshape(-1))
            p.data = self.flat[off : off + n].view_as(p)
            off += n
        self.flat_np = self.flat.numpy()

    def get_vector(self) -> np.ndarray:
        return self.flat_np.copy()

    def set_vector(self, v: np.ndarray) -> None:
        self.flat_np[:] = v

    def _batches(self, n: int, steps: int, g: np.random.Generator) -> np.ndarray:
        """Indices for ``steps`` minibatches: consecutive slices of fresh permutations."""
        b = min(self.batch_size, n)
        need = steps * b
        perms = [g.permutation(n) for _ in range(-(-need // n))]
        return np.concatenate(perms)[:need].reshape(steps, b)

    def train(self, v: np.ndarray, x: torch.Tensor, y: torch.Tensor, steps: int,
              device: int, round_: int, call: int) -> tuple[np.ndarray, float]:
        """``steps`` SGD steps from ``v`` on ``(x, y)``; returns (new vector, sum of step losses).

        Minibatches come from the stream ``(seed, BATCH, device, round, call)``.
        """
        self.set_vector(v)
        idx = torch.from_numpy(self._batches(len(y), steps, rng.stream(self.seed, rng.BATCH, device, round_, call)))
        loss_sum = 0.0
        model, params, lr = self.model, self.params, self.lr
        model.train()
        for s in range(steps):
            bi = idx[s]
            for p in params:
                p.grad = None
            loss = F.cross_entropy(model(x[bi]), y[bi])
            loss.backward()
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
            loss_sum += float(loss.detach())
        return self.get_vector(), loss_sum

    @torch.no_grad()
    def evaluate(self, v: np.ndarray, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> tuple[float, int, int]:
        """(sum of losses, correct predictions, samples) of model ``v`` on ``(x, y)``."""
        self.set_vector(v)
        self.model.eval()
        loss_sum, correct = 0.0, 0
        for i in range(0, len(y), batch):
            out = self.model(x[i : i + batch])
            loss_sum += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
            correct += int((out.argmax(1) == y[i : i + batch]).sum())
        return loss_sum, correct, len(y)
