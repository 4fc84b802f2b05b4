"""Real image data sets (MNIST, Fashion-MNIST, CIFAR-10) from a local root.

HPC compute nodes usually have no internet, so nothing is downloaded unless
``download=True`` is asked for.  Two on-disk layouts are understood:

* torchvision's layout, read through ``torchvision.datasets``::

      ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
      ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
      ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}

* a flat directory holding the (gzipped or plain) IDX files directly, for
  MNIST and Fashion-MNIST.  Debian's ``dataset-fashion-mnist`` package
  installs exactly that in ``/usr/share/datasets/fashion-mnist/``
  (``train-images-idx3-ubyte.gz`` ...).  These files are parsed here with
  numpy + gzip, in memory; nothing is unpacked to disk.

The pixels of a split are held once as ``uint8``; :meth:`ImageData.images`
converts only the requested samples to normalised ``float32``.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .source import DataError

log = logging.getLogger(__name__)

IMAGE_DATASETS = ("mnist", "fashion-mnist", "cifar10")

PathLike = Union[str, "os.PathLike[str]"]

# name -> (torchvision class name, num_classes, input_shape, mean, std)
_SPECS: dict[str, tuple[str, int, tuple[int, ...], tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ("MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", 10, (1, 28, 28), (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_META = "batches.meta"


@dataclass(frozen=True, eq=False)
class ImageData:
    """One split of an image data set.

    ``labels`` holds the int64 label of every sample; :meth:`images` returns
    normalised float32 images ``(len(idx), C, H, W)`` for the requested samples.
    """

    labels: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    _pixels: np.ndarray = field(repr=False)  # uint8, (N, H, W) or (N, H, W, C)
    _mean: tuple[float, ...] = field(repr=False)
    _std: tuple[float, ...] = field(repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """``(samples, C, H, W)``, like the array it stands for."""
        return (len(self), *self.input_shape)

    def __getitem__(self, idx: np.ndarray) -> torch.Tensor:
        """``images(idx)``: lets a data set hand out this lazily converted array as ``x``."""
        return self.images(idx)

    def images(self, idx: np.ndarray) -> torch.Tensor:
        """Float32 tensor ``(len(idx), C, H, W)`` of samples ``idx``, scaled to
        [0, 1] and normalised with the data set's per-channel mean/std."""
        idx = np.asarray(idx)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"images(idx): idx must be a 1-D integer array, got dtype={idx.dtype} shape={idx.shape}")
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"images(idx): indices must lie in [0, {n - 1}], got min={idx.min()} max={idx.max()}")
        raw = self._pixels[idx.astype(np.int64, copy=False)]
        if raw.ndim == 3:  # (n, H, W) -> (n, 1, H, W)
            raw = raw[:, None, :, :]
        else:  # (n, H, W, C) -> (n, C, H, W)
            raw = raw.transpose(0, 3, 1, 2)
        x = torch.from_numpy(np.ascontiguousarray(raw)).to(torch.float32).div_(255.0)
        mean = torch.tensor(self._mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self._std, dtype=torch.float32).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)


# --------------------------------------------------------------------------- #
# IDX (MNIST-style) files
# --------------------------------------------------------------------------- #
def _idx_names(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a (possibly gzipped) unsigned-byte IDX file into a uint8 array."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                buf = f.read()
        else:
            buf = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(buf) < 4 + 4 * ndim or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08 or buf[3] != ndim:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file with {ndim} dimension(s) "
            f"(expected magic 00 00 08 {ndim:02x}, got {buf[:4].hex(' ') if len(buf) >= 4 else 'a truncated file'})"
        )
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(buf) - offset != expected:
        raise DataError(f"{path}: header says shape {dims} ({expected} bytes) but {len(buf) - offset} bytes follow")
    return np.frombuffer(buf, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx_pair(directory: Path, train: bool) -> tuple[Path, Path] | None:
    """The (images, labels) files of a split in ``directory``, plain or .gz."""
    found = []
    for name in _idx_names(train):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            return None
    return found[0], found[1]


def _idx_expectation(name: str, root: Path, train: bool) -> str:
    cls = _SPECS[name][0]
    img, lab = _idx_names(train)
    text = (
        f"expected either torchvision's layout {root / cls / 'raw' / img} and {root / cls / 'raw' / lab}, "
        f"or the gzipped IDX files directly in the root: {root / (img + '.gz')} and {root / (lab + '.gz')} "
        f"(plain, unzipped IDX files are accepted as well). To get them: set data.download: true on a machine "
        f"with internet (torchvision fetches them into {root / cls / 'raw'}) and copy the root to the cluster"
    )
    if name == "fashion-mnist":
        text += (
            "; or, on Debian/Ubuntu, `apt-get install dataset-fashion-mnist` and use "
            "data.root: /usr/share/datasets/fashion-mnist"
        )
    return text


def _load_idx_dataset(name: str, root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    cls = _SPECS[name][0]
    split = "train" if train else "test"
    raw = root / cls / "raw"
    tv_files = [raw / f for t in (True, False) for f in _idx_names(t)]
    if all(p.is_file() for p in tv_files) or (download and _find_idx_pair(raw, train) is None
                                              and _find_idx_pair(root, train) is None):
        import torchvision  # lazy: only needed for this layout

        try:
            ds = getattr(torchvision.datasets, cls)(str(root), train=train, download=download)
        except Exception as exc:  # noqa: BLE001 - torchvision raises RuntimeError/URLError/OSError
            raise DataError(f"{name} ({split} split): torchvision could not load/download it: {exc}; "
                            f"{_idx_expectation(name, root, train)}") from exc
        log.info("loaded %s %s split via torchvision from %s", name, split, raw)
        return ds.data.numpy(), ds.targets.numpy()
    for directory in (raw, root):
        pair = _find_idx_pair(directory, train)
        if pair is not None:
            images, labels = _read_idx(pair[0], 3), _read_idx(pair[1], 1)
            if images.shape[0] != labels.shape[0]:
                raise DataError(f"{pair[0]} holds {images.shape[0]} images but {pair[1]} holds {labels.shape[0]} labels")
            log.info("loaded %s %s split from IDX files %s, %s", name, split, pair[0], pair[1])
            return images, labels
    present = sorted(p.name for d in (raw, root) if d.is_dir() for p in d.iterdir() if "ubyte" in p.name)
    what = f"incomplete: only {present} present" if present else "not found"
    raise DataError(f"{name} ({split} split) {what} under {root}; {_idx_expectation(name, root, train)}")


# --------------------------------------------------------------------------- #
# CIFAR-10 pickled batches
# --------------------------------------------------------------------------- #
def _cifar_expectation(root: Path) -> str:
    files = ", ".join(_CIFAR_TRAIN + _CIFAR_TEST + (_CIFAR_META,))
    return (
        f"expected torchvision's layout {root / _CIFAR_DIR}/ holding {files} (the python version of CIFAR-10, "
        f"cifar-10-python.tar.gz unpacked). To get them: set data.download: true on a machine with internet "
        f"(torchvision fetches and unpacks them into {root / _CIFAR_DIR}) and copy the root to the cluster"
    )


def _read_cifar_pickles(base: Path, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 batches directly (used when the md5 check of torchvision fails)."""
    data, labels = [], []
    for fname in files:
        try:
            with open(base / fname, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            arr = np.asarray(entry["data"], dtype=np.uint8)
            lab = entry["labels"] if "labels" in entry else entry["fine_labels"]
        except Exception as exc:  # noqa: BLE001 - unpickling can fail in many ways
            raise DataError(f"{base / fname} is not a CIFAR-10 python batch: {exc!r}") from exc
        if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32 or arr.shape[0] != len(lab):
            raise DataError(f"{base / fname}: expected 'data' of shape (n, 3072) and n labels, "
                            f"got {arr.shape} and {len(lab)} labels")
        data.append(arr)
        labels.append(np.asarray(lab, dtype=np.int64))
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC like torchvision
    return np.ascontiguousarray(images), np.concatenate(labels)


def _load_cifar10(root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision  # lazy

    split = "train" if train else "test"
    base = root / _CIFAR_DIR
    needed = (_CIFAR_TRAIN if train else _CIFAR_TEST) + (_CIFAR_META,)
    missing = [f for f in needed if not (base / f).is_file()]
    if missing and not download:
        what = "incomplete" if base.is_dir() else "not found"
        raise DataError(f"cifar10 ({split} split) {what} under {root}: missing {missing} in {base}; "
                        f"{_cifar_expectation(root)}")
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
    except RuntimeError as exc:
        if missing:
            raise DataError(f"cifar10 ({split} split): torchvision could not load it: {exc}; "
                            f"{_cifar_expectation(root)}") from exc
        log.warning("cifar10: files in %s fail torchvision's md5 check (not the official release?); "
                    "loading the pickled batches directly", base)
        images, labels = _read_cifar_pickles(base, needed[:-1])
    except Exception as exc:  # noqa: BLE001 - download errors (URLError, OSError)
        raise DataError(f"cifar10 ({split} split): download failed: {exc}; {_cifar_expectation(root)}") from exc
    else:
        images, labels = np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)
        log.info("loaded cifar10 %s split via torchvision from %s", split, base)
    return images, labels


# --------------------------------------------------------------------------- #
def load_image_data(name: str, root: PathLike, train: bool, download: bool = False) -> ImageData:
    """Load split ``train``/test of ``name`` (one of :data:`IMAGE_DATASETS`) from ``root``.

    Raises :class:`DataError` naming the expected files when the root is
    missing or incomplete; downloads through torchvision only if ``download``.
    """
    if name not in _SPECS:
        raise ValueError(f"data.name={name!r}: unknown image data set; valid names are {IMAGE_DATASETS}")
    root_path = Path(os.path.expanduser(os.fspath(root)))
    _, num_classes, shape, mean, std = _SPECS[name]
    if not root_path.is_dir() and not download:
        expect = _cifar_expectation(root_path) if name == "cifar10" else _idx_expectation(name, root_path, train)
        raise DataError(f"data.root={str(root_path)!r} does not exist or is not a directory; {expect}")
    if name == "cifar10":
        images, labels = _load_cifar10(root_path, train, download)
    else:
        images, labels = _load_idx_dataset(name, root_path, train, download)
    if images.shape[1:] != (shape[1:] if shape[0] == 1 else shape[1:] + shape[:1]):
        raise DataError(f"{name}: images of shape {images.shape[1:]} found under {root_path}, expected {shape}")
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{name}: labels outside [0, {num_classes - 1}] found under {root_path} "
                        f"(min={labels.min()}, max={labels.max()})")
    labels.setflags(write=False)
    return ImageData(labels=labels, num_classes=num_classes, input_shape=shape, _pixels=images, _mean=mean, _std=std)


def _loader(name: str) -> Callable[..., tuple[ImageData, np.ndarray]]:
    """The data-set function (registry interface) of the image data set ``name``."""

    def load(root: PathLike, train: bool, download: bool = False) -> tuple[ImageData, np.ndarray]:
        data = load_image_data(name, root, train, download)
        return data, data.labels

    load.__name__ = load.__qualname__ = name.replace("-", "_")
    load.__doc__ = f"{name} from a local root: ``(images, labels)``; downloads only with ``download=True``."
    return load


mnist = _loader("mnist")
fashion_mnist = _loader("fashion-mnist")
cifar10 = _loader("cifar10")
