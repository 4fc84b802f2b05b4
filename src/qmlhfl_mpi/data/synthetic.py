"""The embedded generated data sets: Synthetic(alpha, beta) and least squares.

``synthetic`` is Synthetic(alpha, beta) of the federated learning literature
(Shamir et al.; Li et al., FedProx), generated deterministically per device
from ``(seed, device)``, non-IID by construction: device ``k`` has its own
softmax-regression teacher ``W_k, b_k ~ N(u_k, 1)`` with ``u_k ~ N(0, alpha)``
and its own feature mean ``v_k ~ N(B_k, 1)``, ``B_k ~ N(0, beta)``; features
have covariance ``diag(j^-1.2)``.  A share of each device's samples is held
out, and the union of the held-out parts is the test set.  Each rank
generates only its own devices.
"""
from __future__ import annotations

import numpy as np

from ..core import rng
from .source import GeneratedDataset


class Synthetic(GeneratedDataset):
    """Synthetic(alpha, beta): float32 features, int64 labels."""

    def __init__(self, seed: int, *, alpha: float = 1.0, beta: float = 1.0, dim: int = 60, classes: int = 10,
                 samples: int = 200, size_sigma: float = 0.5, test_fraction: float = 0.2) -> None:
        self.seed, self.alpha, self.beta, self.dim, self.classes = seed, alpha, beta, dim, classes
        self.samples, self.size_sigma, self.test_fraction = samples, size_sigma, test_fraction

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def num_classes(self) -> int:
        return self.classes

    def expected_samples(self) -> float:
        """The mean of the lognormal device sizes, ``samples * exp(size_sigma^2 / 2)``."""
        return float(self.samples * np.exp(self.size_sigma**2 / 2))

    def size(self, device: int) -> int:
        g = rng.stream(self.seed, rng.SIZES, device)
        n = int(round(self.samples * float(np.exp(self.size_sigma * g.standard_normal()))))
        return max(n, 2)

    def train_size(self, device: int) -> int:
        n = self.size(device)
        n_test = min(n - 1, max(1, int(round(self.test_fraction * n))))
        return n - n_test

    def device(self, device: int) -> tuple[np.ndarray, np.ndarray]:
        return self._samples(device, self.size(device))

    def train_data(self, device: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The training samples alone: the first ``train_size`` rows of :meth:`device`, drawn without the
        held-out ones (the features fill row after row from the device's stream; a label depends on its row)."""
        return self._samples(device, self.train_size(device) if size is None else size)

    def _samples(self, device: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` samples of the device."""
        g = rng.stream(self.seed, rng.DATA, device)
        u = g.normal(0.0, np.sqrt(self.alpha)) if self.alpha > 0 else 0.0
        bmean = g.normal(0.0, np.sqrt(self.beta)) if self.beta > 0 else 0.0
        W = g.normal(u, 1.0, (self.dim, self.classes))
        b = g.normal(u, 1.0, self.classes)
        v = g.normal(bmean, 1.0, self.dim)
        sd = np.arange(1, self.dim + 1, dtype=np.float64) ** (-0.6)  # sqrt of j^-1.2
        x = g.standard_normal((n, self.dim))
        x *= sd  # in place: the same products and sums as v + sd * z, without two temporaries
        x += v
        scores = x @ W
        scores += b
        return x.astype(np.float32), np.argmax(scores, axis=1).astype(np.int64)


class LeastSquares(Synthetic):
    """Least squares: ``y = x . w_k + 0.1 noise`` with ``w_k = w* + N(0, alpha)`` (model
    heterogeneity) and features ``N(v_k, diag(j^-1.2))``, ``v_k ~ N(0, beta)``
    (feature heterogeneity).  float32 features and targets (``num_classes`` is 1)."""

    @property
    def num_classes(self) -> int:
        return 1

    def train_data(self, device: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first rows of :meth:`device` (its noise is drawn after all features: no shortcut)."""
        return GeneratedDataset.train_data(self, device, size)

    def device(self, device: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.size(device)
        w_star = rng.stream(self.seed, rng.DATA, 2**32).standard_normal(self.dim)
        g = rng.stream(self.seed, rng.DATA, device)
        w = w_star + (g.normal(0.0, np.sqrt(self.alpha), self.dim) if self.alpha > 0 else 0.0)
        v = g.normal(0.0, np.sqrt(self.beta), self.dim) if self.beta > 0 else np.zeros(self.dim)
        sd = np.arange(1, self.dim + 1, dtype=np.float64) ** (-0.6)
        x = v + sd * g.standard_normal((n, self.dim))
        y = x @ w + 0.1 * g.standard_normal(n)
        return x.astype(np.float32), y.astype(np.float32)
