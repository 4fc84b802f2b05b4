"""Federated data for the devices one rank hosts.

``synthetic`` is the embedded default: Synthetic(alpha, beta) of the federated
learning literature (Shamir et al.; Li et al., FedProx), generated
deterministically per device from ``(seed, device)``, non-IID by construction:
device ``k`` has its own softmax-regression teacher ``W_k, b_k ~ N(u_k, 1)``
with ``u_k ~ N(0, alpha)`` and its own feature mean ``v_k ~ N(B_k, 1)``,
``B_k ~ N(0, beta)``; features have covariance ``diag(j^-1.2)``.  A share of
each device's samples is held out, and the union of the held-out parts is the
test set.  Each rank generates only its own devices.

The image data sets (``mnist``, ``fashion-mnist``, ``cifar10``) are read from a
local root by :mod:`qmlhfl_mpi.datasets` and split over devices by
:mod:`qmlhfl_mpi.partition`; each rank keeps only its devices' samples and its
contiguous slice of the test set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import rng
from .config import Config
from .topology import Tree


TEST_CHUNK = 250  # images per evaluation chunk


@dataclass
class LocalData:
    """What one rank holds: its devices' training data and its share of the test set."""

    train: dict[int, tuple[torch.Tensor, torch.Tensor]]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    samples: np.ndarray  # training samples of EVERY device (int64, length D)
    # the test set is cut into chunks fixed by the data alone (not by the rank
    # count); this rank evaluates (chunk id, start, stop) slices of test_x/test_y
    test_chunks: list[tuple[int, int, int]]
    num_test_chunks: int


def _synthetic_size(cfg: Config, device: int) -> int:
    s = cfg.data.synthetic
    g = rng.stream(cfg.train.seed, rng.SIZES, device)
    n = int(round(s.samples * float(np.exp(s.size_sigma * g.standard_normal()))))
    return max(n, 2)


def _split_sizes(cfg: Config, n: int) -> tuple[int, int]:
    n_test = min(n - 1, max(1, int(round(cfg.data.synthetic.test_fraction * n))))
    return n - n_test, n_test


def synthetic_device(cfg: Config, device: int) -> tuple[np.ndarray, np.ndarray]:
    """All samples (train then test) of one device: float32 features, int64 labels."""
    s = cfg.data.synthetic
    n = _synthetic_size(cfg, device)
    g = rng.stream(cfg.train.seed, rng.DATA, device)
    u = g.normal(0.0, np.sqrt(s.alpha)) if s.alpha > 0 else 0.0
    bmean = g.normal(0.0, np.sqrt(s.beta)) if s.beta > 0 else 0.0
    W = g.normal(u, 1.0, (s.dim, s.classes))
    b = g.normal(u, 1.0, s.classes)
    v = g.normal(bmean, 1.0, s.dim)
    sd = np.arange(1, s.dim + 1, dtype=np.float64) ** (-0.6)  # sqrt of j^-1.2
    x = v + sd * g.standard_normal((n, s.dim))
    y = np.argmax(x @ W + b, axis=1)
    return x.astype(np.float32), y.astype(np.int64)


def lstsq_device(cfg: Config, device: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares regression data of one device: ``y = x . w_k + 0.1 noise`` with
    ``w_k = w* + N(0, alpha)`` (model heterogeneity) and features ``N(v_k, diag(j^-1.2))``,
    ``v_k ~ N(0, beta)`` (feature heterogeneity).  float32 features and targets."""
    s = cfg.data.synthetic
    n = _synthetic_size(cfg, device)
    w_star = rng.stream(cfg.train.seed, rng.DATA, 2**32).standard_normal(s.dim)
    g = rng.stream(cfg.train.seed, rng.DATA, device)
    w = w_star + (g.normal(0.0, np.sqrt(s.alpha), s.dim) if s.alpha > 0 else 0.0)
    v = g.normal(0.0, np.sqrt(s.beta), s.dim) if s.beta > 0 else np.zeros(s.dim)
    sd = np.arange(1, s.dim + 1, dtype=np.float64) ** (-0.6)
    x = v + sd * g.standard_normal((n, s.dim))
    y = x @ w + 0.1 * g.standard_normal(n)
    return x.astype(np.float32), y.astype(np.float32)


def _load_synthetic(cfg: Config, tree: Tree, devices: range) -> LocalData:
    s = cfg.data.synthetic
    regression = cfg.data.name == "lstsq"
    make = lstsq_device if regression else synthetic_device
    samples = np.array([_split_sizes(cfg, _synthetic_size(cfg, k))[0] for k in range(tree.num_devices)], dtype=np.int64)
    train: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    tx, ty, chunks, off = [], [], [], 0
    for k in devices:  # one test chunk per device: its held-out samples
        x, y = make(cfg, k)
        n_train = samples[k]
        train[k] = (torch.from_numpy(x[:n_train]), torch.from_numpy(y[:n_train]))
        tx.append(x[n_train:])
        ty.append(y[n_train:])
        chunks.append((k, off, off + len(y) - n_train))
        off += len(y) - n_train
    return LocalData(
        train=train,
        test_x=torch.from_numpy(np.concatenate(tx)),
        test_y=torch.from_numpy(np.concatenate(ty)),
        num_classes=1 if regression else s.classes,
        input_shape=(s.dim,),
        samples=samples,
        test_chunks=chunks,
        num_test_chunks=tree.num_devices,
    )


def _load_images(cfg: Config, tree: Tree, devices: range, rank: int, num_ranks: int) -> LocalData:
    from .datasets import load_image_data
    from .partition import partition

    d, p = cfg.data, cfg.data.partition
    full = load_image_data(d.name, d.root, train=True, download=d.download)
    groups = [tree.device_range(1, u) for u in range(tree.num_nodes(1))]
    parts = partition(
        full.labels, tree.num_devices, p.kind, cfg.train.seed,
        classes_per_device=p.classes_per_device, alpha=p.alpha, size_sigma=p.size_sigma,
        classes_per_edge=p.classes_per_edge, groups=groups,
    )
    train = {}
    for k in devices:
        idx = parts[k]
        train[k] = (full.images(idx), torch.from_numpy(full.labels[idx].astype(np.int64)))
    samples = np.array([len(ix) for ix in parts], dtype=np.int64)
    num_classes, shape = full.num_classes, full.input_shape
    del full
    test = load_image_data(d.name, d.root, train=False, download=d.download)
    n = len(test.labels)
    num_chunks = -(-n // TEST_CHUNK)
    ids = np.array_split(np.arange(num_chunks), num_ranks)[rank]
    lo, hi = (int(ids[0]) * TEST_CHUNK, min(n, (int(ids[-1]) + 1) * TEST_CHUNK)) if len(ids) else (0, 0)
    mine = np.arange(lo, hi)
    chunks = [(int(c), int(c) * TEST_CHUNK - lo, min(n, (int(c) + 1) * TEST_CHUNK) - lo) for c in ids]
    return LocalData(
        train=train,
        test_x=test.images(mine),
        test_y=torch.from_numpy(test.labels[mine].astype(np.int64)),
        num_classes=num_classes,
        input_shape=shape,
        samples=samples,
        test_chunks=chunks,
        num_test_chunks=num_chunks,
    )


IMAGE_SPECS = {"mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}


def input_spec(cfg: Config) -> tuple[tuple[int, ...], int]:
    """(input shape, outputs) of the configured data set, without loading it."""
    if cfg.data.name in ("synthetic", "lstsq"):
        s = cfg.data.synthetic
        return (s.dim,), (1 if cfg.data.name == "lstsq" else s.classes)
    return IMAGE_SPECS[cfg.data.name]


def load_local_data(cfg: Config, tree: Tree, devices: range, rank: int, num_ranks: int) -> LocalData:
    """Data of the devices ``devices`` hosted by ``rank`` (not collective)."""
    if cfg.data.name in ("synthetic", "lstsq"):
        return _load_synthetic(cfg, tree, devices)
    return _load_images(cfg, tree, devices, rank, num_ranks)
