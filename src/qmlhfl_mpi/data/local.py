"""The federated data one rank holds: its devices' training sets, made when a device is drawn, and its share of
the test set, cut into evaluation chunks fixed by the data alone.

Not collective; built by :mod:`qmlhfl_mpi.config.build` from a data set and a
partition.  Memory follows the drawn work, not the population:

* a device's training data is produced when the executor first asks for it
  (:class:`DeviceStore`): a generated data set makes it from the device's
  keyed stream, a pooled one takes the device's index share of the data set's
  (possibly memory-mapped) arrays;
* produced devices are kept in a least-recently-used cache of ``data.cache_mb``
  per rank, so a run whose devices all fit trains from memory after its first
  round, and a run over a million devices holds only the devices drawn lately;
* a generated data set's test set is the held-out part of ``data.test_devices``
  devices spread evenly over the tree (all of them by default).

The chunks of the test set do not depend on the rank count, so the summed
evaluation is the same float for any number of ranks.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .source import GeneratedDataset, Pooled, take

__all__ = ["DeviceStore", "LocalData", "evaluation_devices", "generated_local_data", "pooled_local_data"]

TEST_CHUNK = 250  # test samples per evaluation chunk of a pooled data set

Make = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def evaluation_devices(num_devices: int, count: int) -> np.ndarray:
    """The devices whose held-out samples form a generated data set's test set: all of them when ``count`` is 0
    or at least ``num_devices``, else ``count`` devices spread evenly, ``floor(i * D / count)``."""
    if count <= 0 or count >= num_devices:
        return np.arange(num_devices, dtype=np.int64)
    return (np.arange(count, dtype=np.int64) * num_devices) // count


class DeviceStore(Mapping[int, tuple[torch.Tensor, torch.Tensor]]):
    """The training data ``(x, y)`` of the devices a rank hosts, each made on first use by ``make(device)`` and
    kept in a least-recently-used cache of at most ``cache_bytes`` (the most recent device always stays).

    :attr:`made` counts the devices produced (a device evicted and asked for again counts again);
    :attr:`made_devices` holds which.  Class counts of the devices produced are kept (a few integers each) for
    the results file (:meth:`take_counts`).  Iterating produces every hosted device: meant for small runs and
    tests."""

    def __init__(self, devices: Sequence[int], make: Make, cache_bytes: int, num_classes: int,
                 known_counts: Mapping[int, np.ndarray] | None = None) -> None:
        self.devices = devices
        self._make = make
        self.cache_bytes = int(cache_bytes)
        self.num_classes = max(int(num_classes), 1)
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._device: torch.device | None = None
        self.made = 0
        self.made_devices: set[int] = set()
        self._pending: dict[int, np.ndarray] = dict(known_counts or {})

    def __contains__(self, key: object) -> bool:
        return key in self.devices

    def __len__(self) -> int:
        return len(self.devices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.devices)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if key not in self.devices:
            raise KeyError(f"device {key} is not hosted on this rank")
        x, y = self._make(key)
        self.made += 1
        self.put(key, x, y)
        return self._cache[key]  # the device just put always stays (on the store's torch device)

    def put(self, key: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep device ``key``'s training data and note its classes."""
        if self._device is not None:
            x, y = x.to(self._device), y.to(self._device)
        if key not in self.made_devices:
            self.made_devices.add(key)
            self._pending.setdefault(key, _class_counts(y, self.num_classes))
        self._cache[key] = (x, y)
        self._bytes += _nbytes(x, y)
        while self._bytes > self.cache_bytes and len(self._cache) > 1:
            _, (ox, oy) = self._cache.popitem(last=False)
            self._bytes -= _nbytes(ox, oy)

    @property
    def cached(self) -> int:
        """Devices held in the cache now."""
        return len(self._cache)

    def to(self, device: torch.device) -> None:
        """Keep (and move) the devices' tensors on ``device``."""
        self._device = device
        for k, (x, y) in self._cache.items():
            self._cache[k] = (x.to(device), y.to(device))

    def take_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(devices, counts)`` of the devices whose class counts became known since the last call: int64 ids,
        ascending, and their ``(len, classes)`` training samples per class."""
        if not self._pending:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.num_classes), dtype=np.int64)
        ids = np.array(sorted(self._pending), dtype=np.int64)
        rows = np.stack([self._pending[int(k)] for k in ids]).astype(np.int64)
        self._pending.clear()
        return ids, rows


def _nbytes(x: torch.Tensor, y: torch.Tensor) -> int:
    return x.element_size() * x.nelement() + y.element_size() * y.nelement()


def _class_counts(y: torch.Tensor | np.ndarray, classes: int) -> np.ndarray:
    labels = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if labels.dtype.kind == "f":  # regression targets: every sample in the one column
        return np.array([labels.size] + [0] * (classes - 1), dtype=np.int64)
    return np.bincount(labels, minlength=classes)[:classes].astype(np.int64)


@dataclass
class LocalData:
    """What one rank holds: its devices' training data (made when drawn) and its share of the test set."""

    train: DeviceStore
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int          # 1 for regression targets
    input_shape: tuple[int, ...]
    samples: np.ndarray       # training samples of every device (int64, length D; see samples_complete)
    # this rank evaluates the (chunk id, start, stop) slices of test_x/test_y
    test_chunks: list[tuple[int, int, int]]
    num_test_chunks: int
    samples_complete: bool = True  # False: only the hosted devices' entries are filled (the others are 0)
    test_devices: int = 0     # devices whose held-out samples form the test set (0: a pooled test split)

    def to(self, device: torch.device) -> None:
        """Keep every tensor on ``device``."""
        self.train.to(device)
        self.test_x, self.test_y = self.test_x.to(device), self.test_y.to(device)


def validation_size(train_size: int, fraction: float) -> int:
    """Training samples a device of a generated data set holds out for validation: ``round(fraction n)``, at
    least one and leaving at least one to train on (none when ``fraction`` is 0 or the device has one)."""
    if not fraction > 0 or train_size < 2:
        return 0
    return min(train_size - 1, max(1, int(round(fraction * train_size))))


def generated_local_data(ds: GeneratedDataset, num_devices: int, devices: Sequence[int], *, cache_bytes: int,
                         test_devices: int = 0, all_samples: bool = True, validation: float = 0.0) -> LocalData:
    """The devices ``devices`` of a generated data set, made when drawn.  The test set is the held-out part of
    :func:`evaluation_devices` (``test_devices``), one evaluation chunk per such device.  Training data always
    come from ``ds.train_data`` when a device is drawn (never from the test set's draw), so a device trains on
    the same bits whatever the cache holds.  ``all_samples``: count every device's training samples here (else
    only ``devices``').  ``validation`` > 0: every device trains on the first ``n - m`` of its ``n`` training
    samples (:func:`validation_size`), and the evaluation devices' last ``m`` replace their test part."""
    samples = np.zeros(num_devices, dtype=np.int64)
    for k in (range(num_devices) if all_samples else devices):
        n = ds.train_size(k)
        samples[k] = n - validation_size(n, validation)

    def make(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = ds.train_data(k, int(samples[k]) if samples[k] else None)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    store = DeviceStore(devices, make, cache_bytes, ds.num_classes)
    evaluated = evaluation_devices(num_devices, test_devices)
    lo, hi = (min(devices), max(devices) + 1) if len(devices) else (0, 0)
    first, last = np.searchsorted(evaluated, [lo, hi])
    tx, ty, chunks, off = [], [], [], 0
    for cid in range(int(first), int(last)):
        k = int(evaluated[cid])
        if k not in devices:
            continue
        x, y = ds.device(k)
        n = ds.train_size(k)
        lo_k, hi_k = (n - validation_size(n, validation), n) if validation > 0 else (n, len(y))
        tx.append(x[lo_k:hi_k])
        ty.append(y[lo_k:hi_k])
        chunks.append((cid, off, off + hi_k - lo_k))
        off += hi_k - lo_k
    dtype_y = np.float32 if ds.num_classes == 1 else np.int64
    test_x = np.concatenate(tx) if tx else np.zeros((0, *ds.input_shape), dtype=np.float32)
    test_y = np.concatenate(ty) if ty else np.zeros(0, dtype=dtype_y)
    return LocalData(train=store, test_x=torch.from_numpy(test_x), test_y=torch.from_numpy(test_y),
                     num_classes=ds.num_classes, input_shape=ds.input_shape, samples=samples, test_chunks=chunks,
                     num_test_chunks=len(evaluated), samples_complete=all_samples, test_devices=len(evaluated))


def num_classes_of(train: Pooled, test: Pooled) -> int:
    """1 for regression targets, else the largest label + 1."""
    if train.regression:
        return 1
    return int(max(train.y.max(), test.y.max() if len(test) else 0)) + 1


def pooled_local_data(train: Pooled, test: Pooled, parts: list[np.ndarray], devices: Sequence[int],
                      rank: int, num_ranks: int, *, cache_bytes: int) -> LocalData:
    """The devices' shares ``parts[k]`` of ``train`` (taken when drawn) and this rank's contiguous test chunks.
    The class counts of every hosted device are known from the labels alone."""
    classes = num_classes_of(train, test)

    def make(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return take(train.x, parts[k]), torch.from_numpy(np.ascontiguousarray(train.y[parts[k]]))

    labels = np.zeros(len(train), dtype=np.int64) if train.regression else train.y
    known = {int(k): np.bincount(labels[parts[k]], minlength=classes)[:classes].astype(np.int64) for k in devices}
    store = DeviceStore(devices, make, cache_bytes, classes, known_counts=known)
    n = len(test)
    num_chunks = -(-n // TEST_CHUNK)
    ids = np.array_split(np.arange(num_chunks), num_ranks)[rank]
    lo, hi = (int(ids[0]) * TEST_CHUNK, min(n, (int(ids[-1]) + 1) * TEST_CHUNK)) if len(ids) else (0, 0)
    mine = np.arange(lo, hi)
    chunks = [(int(c), int(c) * TEST_CHUNK - lo, min(n, (int(c) + 1) * TEST_CHUNK) - lo) for c in ids]
    return LocalData(train=store, test_x=take(test.x, mine),
                     test_y=torch.from_numpy(np.ascontiguousarray(test.y[mine])),
                     num_classes=classes, input_shape=train.input_shape,
                     samples=np.array([len(p) for p in parts], dtype=np.int64), test_chunks=chunks,
                     num_test_chunks=num_chunks)
