"""The two kinds of data set and the checks on what a data-set plug-in returns.

* A *pooled* data set is a function ``f(root, train, **args)`` returning
  ``(x, y)`` or ``(x, y, owner)`` (see :mod:`qmlhfl_mpi.data.registry`); its
  training split is divided over the devices by a partitioner.
* A *generated* data set (:class:`GeneratedDataset`) makes each device's
  samples from ``(seed, device)`` on the rank that hosts the device, so memory
  per rank depends only on the devices it hosts.

:func:`load_pooled` calls a pooled data set and checks its result, raising
:class:`DataError` with a message that names the data set and what was
expected.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DataError", "GeneratedDataset", "Pooled", "load_pooled", "take"]


class DataError(ValueError):
    """Missing, incomplete or malformed data; the message says what is expected."""


class GeneratedDataset(ABC):
    """Data made per device: ``device(k)`` returns all samples (train first, then
    test) of device ``k``; ``train_size(k)`` how many of them are for training."""

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Classes, or 1 for regression targets."""

    @abstractmethod
    def train_size(self, device: int) -> int: ...

    @abstractmethod
    def device(self, device: int) -> tuple[np.ndarray, np.ndarray]: ...

    def train_data(self, device: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The training samples of ``device`` (what it trains on when drawn; ``size``: its ``train_size`` if
        known): by default the first ``train_size`` of :meth:`device`; override when they can be made without
        the held-out ones."""
        x, y = self.device(device)
        n = self.train_size(device) if size is None else size
        return x[:n], y[:n]

    def expected_samples(self) -> float:
        """Mean samples (train and test) of a device, for the memory estimate; by default from the first
        32 devices' training sizes and a 20% test share.  Override when the mean is known in closed form."""
        return float(np.mean([self.train_size(k) for k in range(32)])) / 0.8


@dataclass(frozen=True, eq=False)
class Pooled:
    """One split of a pooled data set, checked."""

    x: Any                    # (n, *input_shape), indexable by an int64 index array
    y: np.ndarray             # int64 labels or float32 targets, (n,)
    owner: np.ndarray | None  # owner id per sample, or None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def regression(self) -> bool:
        return bool(np.issubdtype(self.y.dtype, np.floating))

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _as_numpy(a: Any, where: str, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as e:  # ragged lists, objects numpy cannot convert
        raise DataError(f"{where}: {what} cannot be converted to an array ({e}); expected a numpy array, a torch "
                        "tensor or a (nested) list of numbers of one length per row") from None


def _numeric(kind: str) -> bool:
    return kind in "iuf"


def _check_x(x: Any, where: str) -> tuple[Any, tuple[int, ...]]:
    """``x`` (lists made arrays) and its shape; :class:`DataError` unless it is an array of numbers
    ``(samples, *input_shape)`` indexable by an index array."""
    if isinstance(x, (list, tuple)):
        x = _as_numpy(x, where, "x")
    expect = "expected an array of numbers of shape (samples, *input_shape), e.g. float32 (n, features)"
    raw_shape = getattr(x, "shape", None)
    try:
        shape = tuple(int(d) for d in raw_shape) if raw_shape is not None else None
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) < 2:
        raise DataError(f"{where}: x must be an array of shape (samples, *input_shape), got "
                        f"{type(x).__name__} of shape {raw_shape}; {expect}")
    if any(d < 1 for d in shape[1:]):
        raise DataError(f"{where}: x has shape {shape}: every input dimension must be >= 1; {expect}")
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise DataError(f"{where}: x must be numeric (integer or float), got {x.dtype}; {expect}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise DataError(f"{where}: x contains NaN or inf; {expect}, all finite")
    elif isinstance(x, np.ndarray):
        if not _numeric(x.dtype.kind):
            raise DataError(f"{where}: x must be numeric, got dtype {x.dtype}; {expect}")
        if x.dtype.kind == "f" and not isinstance(x, np.memmap) and not np.isfinite(x).all():  # memmap: lazy
            raise DataError(f"{where}: x contains NaN or inf; {expect}, all finite")
    elif not callable(getattr(x, "__getitem__", None)):
        raise DataError(f"{where}: x is a {type(x).__name__}, which cannot be indexed by sample; {expect}")
    return x, shape


def load_pooled(fn: Callable[..., Any], name: str, root: str, train: bool, args: dict[str, Any]) -> Pooled:
    """Call the data set ``fn`` (registered as ``name``) and check its result.

    Checked: a tuple ``(x, y)`` or ``(x, y, owner)``; ``x`` an array of numbers
    ``(n, *input_shape)`` (finite if float; numpy, torch or an object with
    ``shape`` and ``__getitem__``); ``y`` 1-D with ``n`` integer labels >= 0 or
    finite float targets; ``owner`` 1-D with ``n`` integer or string ids.
    Anything else is a :class:`DataError` naming the data set and what was expected.
    """
    split = "train" if train else "test"
    where = f"data set {name!r} ({split} split)"
    try:
        out = fn(root, train, **args)
    except DataError:
        raise
    except TypeError as e:
        raise DataError(f"{where}: calling it as f(root, train, **data.args) with data.args={args!r} failed: "
                        f"{e}") from None
    except Exception as e:  # noqa: BLE001 - anything the loader raises
        raise DataError(f"{where} could not be loaded: {type(e).__name__}: {e}") from None
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise DataError(f"{where} returned {type(out).__name__}; expected a tuple (x, y) or (x, y, owner)")
    x, shape = _check_x(out[0], where)
    y = _as_numpy(out[1], where, "y")
    if y.ndim != 1 or y.shape[0] != shape[0]:
        raise DataError(f"{where}: y must be 1-D with one entry per sample ({shape[0]}), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.integer):
        y = y.astype(np.int64, copy=False)
        if y.size and y.min() < 0:
            raise DataError(f"{where}: class labels must be >= 0, found {int(y.min())}")
    elif np.issubdtype(y.dtype, np.floating):
        y = y.astype(np.float32, copy=False)
        if not np.isfinite(y).all():
            raise DataError(f"{where}: regression targets y contain NaN or inf")
    else:
        raise DataError(f"{where}: y must hold integer class labels or float targets, got dtype {y.dtype}")
    owner = None
    if len(out) == 3 and out[2] is not None:
        owner = _as_numpy(out[2], where, "owner")
        if owner.ndim != 1 or owner.shape[0] != shape[0]:
            raise DataError(f"{where}: owner must be 1-D with one id per sample ({shape[0]}), got shape "
                            f"{owner.shape}")
        if owner.dtype.kind not in "iuUS":
            raise DataError(f"{where}: owner ids must be integers or strings, got dtype {owner.dtype}")
    if shape[0] == 0:
        raise DataError(f"{where} is empty")
    return Pooled(x, y, owner)


def take(x: Any, idx: np.ndarray) -> torch.Tensor:
    """Samples ``idx`` of ``x`` as a contiguous float32 tensor."""
    part = x[torch.from_numpy(idx)] if isinstance(x, torch.Tensor) else x[idx]
    if isinstance(part, torch.Tensor):
        return part.detach().to(torch.float32).contiguous()
    return torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
