"""Local SGD on a flat float32 parameter vector (not collective).

The model's parameters are views into one flat ``float32`` buffer, so the
boundary to the aggregation code is a single numpy vector with no copies of
individual tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core import rng


class LocalTrainer:
    """Plain SGD (learning rate ``lr``, batch size ``batch_size``) on one rank's model.

    One instance serves all devices a rank hosts: :meth:`train` loads the start
    vector, takes the steps and returns the new vector.
    """

    def __init__(self, model: torch.nn.Module, lr: float, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.params: list[torch.Tensor] = [p for p in self.model.parameters()]
        self.dim = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        off = 0
        for p in self.params:
            n = p.numel()
            self.flat[off : off + n].copy_(p.data.reshape(-1))
            p.data = self.flat[off : off + n].view_as(p)
            off += n

    def get_vector(self) -> np.ndarray:
        return self.flat.cpu().numpy().copy()

    def set_vector(self, v: np.ndarray) -> None:
        self.flat.copy_(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)))

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
        Randomness inside the model's forward (dropout) comes from torch's
        default generator, which is seeded from ``(seed, FORWARD, device,
        round, call)`` for this call and restored afterwards, so it too does
        not depend on the rank that trains the device.
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
            loss_sum = self._steps(x, y, idx, steps)
        return self.get_vector(), loss_sum

    def _steps(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, steps: int) -> float:
        loss_sum = 0.0
        model, params, lr = self.model, self.params, self.lr
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

    @torch.no_grad()
    def evaluate(self, v: np.ndarray, x: torch.Tensor, y: torch.Tensor,
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
                pred, target = self.model(x[i : min(hi, i + batch)]), y[i : min(hi, i + batch)]
                loss_sum += float(loss_fn(pred, target, reduction="sum"))
                if not target.is_floating_point():
                    correct += int((pred.argmax(1) == target).sum())
            out[cid] = (loss_sum, correct, hi - lo)
        return out


def loss_fn(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy for class labels; ``0.5 (out - y)^2`` for float targets (least squares)."""
    if y.is_floating_point():
        return 0.5 * F.mse_loss(out.squeeze(-1), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)
