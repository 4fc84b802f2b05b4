"""The federated data one rank holds: its devices' training sets and its share
of the test set, cut into evaluation chunks fixed by the data alone.

Not collective; built by :mod:`qmlhfl_mpi.config.build` from a data set and a
partition.  The chunks of the test set do not depend on the rank count, so the
summed evaluation is the same float for any number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .source import GeneratedDataset, Pooled, take

TEST_CHUNK = 250  # test samples per evaluation chunk of a pooled data set


@dataclass
class LocalData:
    """What one rank holds: its devices' training data and its share of the test set."""

    train: dict[int, tuple[torch.Tensor, torch.Tensor]]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int          # 1 for regression targets
    input_shape: tuple[int, ...]
    samples: np.ndarray       # training samples of EVERY device (int64, length D)
    # this rank evaluates the (chunk id, start, stop) slices of test_x/test_y
    test_chunks: list[tuple[int, int, int]]
    num_test_chunks: int

    def to(self, device: torch.device) -> None:
        """Move every tensor to ``device``."""
        self.train = {k: (x.to(device), y.to(device)) for k, (x, y) in self.train.items()}
        self.test_x, self.test_y = self.test_x.to(device), self.test_y.to(device)


def generated_local_data(ds: GeneratedDataset, num_devices: int, devices: range) -> LocalData:
    """Generate the devices ``devices``; every device's held-out part is one test chunk."""
    samples = np.array([ds.train_size(k) for k in range(num_devices)], dtype=np.int64)
    train: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    tx, ty, chunks, off = [], [], [], 0
    for k in devices:
        x, y = ds.device(k)
        n_train = int(samples[k])
        train[k] = (torch.from_numpy(x[:n_train]), torch.from_numpy(y[:n_train]))
        tx.append(x[n_train:])
        ty.append(y[n_train:])
        chunks.append((k, off, off + len(y) - n_train))
        off += len(y) - n_train
    return LocalData(train=train, test_x=torch.from_numpy(np.concatenate(tx)),
                     test_y=torch.from_numpy(np.concatenate(ty)), num_classes=ds.num_classes,
                     input_shape=ds.input_shape, samples=samples, test_chunks=chunks, num_test_chunks=num_devices)


def num_classes_of(train: Pooled, test: Pooled) -> int:
    """1 for regression targets, else the largest label + 1."""
    if train.regression:
        return 1
    return int(max(train.y.max(), test.y.max() if len(test) else 0)) + 1


def pooled_local_data(train: Pooled, test: Pooled, parts: list[np.ndarray], devices: range,
                      rank: int, num_ranks: int) -> LocalData:
    """The devices' shares ``parts[k]`` of ``train`` and this rank's contiguous test chunks."""
    local = {k: (take(train.x, parts[k]), torch.from_numpy(np.ascontiguousarray(train.y[parts[k]])))
             for k in devices}
    n = len(test)
    num_chunks = -(-n // TEST_CHUNK)
    ids = np.array_split(np.arange(num_chunks), num_ranks)[rank]
    lo, hi = (int(ids[0]) * TEST_CHUNK, min(n, (int(ids[-1]) + 1) * TEST_CHUNK)) if len(ids) else (0, 0)
    mine = np.arange(lo, hi)
    chunks = [(int(c), int(c) * TEST_CHUNK - lo, min(n, (int(c) + 1) * TEST_CHUNK) - lo) for c in ids]
    return LocalData(train=local, test_x=take(test.x, mine),
                     test_y=torch.from_numpy(np.ascontiguousarray(test.y[mine])),
                     num_classes=num_classes_of(train, test), input_shape=train.input_shape,
                     samples=np.array([len(p) for p in parts], dtype=np.int64), test_chunks=chunks,
                     num_test_chunks=num_chunks)
