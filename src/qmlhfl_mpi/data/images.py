"""Real image data sets (MNIST, Fashion-MNIST, CIFAR-10) from a local root.

HPC compute nodes usually have no internet, so nothing is downloaded unless
``download=True`` is asked for.  Two on-disk layouts are understood:

* torchvision's layout::

      ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
      ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
      ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}

* a flat directory holding the (gzipped or plain) IDX files directly, for
  MNIST and Fashion-MNIST.  Debian's ``dataset-fashion-mnist`` package
  installs exactly that in ``/usr/share/datasets/fashion-mnist/``
  (``train-images-idx3-ubyte.gz`` ...).  These files are parsed here with
  numpy + gzip, in memory; nothing is unpacked to disk.

All files are parsed here, never by torchvision (which is used only to
download, with ``download=True``, and for CIFAR-10's published checksums):
IDX files with numpy + gzip; CIFAR-10's pickled batches with
:mod:`~qmlhfl_mpi.data.safe_pickle`, which runs no code from the file (a
checksum match is no security boundary: ``data.root`` may point anywhere).
A truncated, corrupt or malformed file is a :class:`DataError` that names the
file and what was expected.

The pixels of a split are held once as ``uint8``; :meth:`ImageData.images`
converts only the requested samples to normalised ``float32``.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
import torch

from . import safe_pickle
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
_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_CLASSES = 10
_CHUNK = 1 << 22  # bytes read at a time from an IDX file
_REFETCH = "re-download or re-copy it"


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


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _read_upto(f: _Readable, n: int) -> bytes:
    """Up to ``n`` bytes of ``f``, fewer only at the end of the file (read in chunks: never
    allocates more than the file holds, whatever a header claims)."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(min(n - got, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """:func:`_parse_idx`, kept for the process's next run (pilots and in-process sweeps) while the file's
    size and modification time are unchanged; the array is read-only."""
    try:
        st = path.stat()
    except OSError:
        return _parse_idx(path, ndim)  # its message names the problem
    return _parse_idx_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, ndim)


@functools.lru_cache(maxsize=4)  # the two files of each split of one data set
def _parse_idx_cached(path: str, size: int, mtime_ns: int, ndim: int) -> np.ndarray:
    del size, mtime_ns  # the cache's key: a changed file is parsed again
    return _parse_idx(Path(path), ndim)


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a (possibly gzipped) unsigned-byte IDX file into a uint8 array.

    The header is read first, then exactly the bytes it announces (plus one, to
    catch trailing data); a cut or corrupt gzip stream, a wrong magic number or
    a length that does not match the header is a :class:`DataError` naming the
    file and what was expected.
    """
    gz = path.suffix == ".gz"
    kind = f"{'gzip-compressed ' if gz else ''}unsigned-byte IDX file with {ndim} dimension(s)"
    what = "images" if ndim == 3 else "labels"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = _read_upto(f, 4 + 4 * ndim)
            magic = bytes([0, 0, 0x08, ndim])
            if header[:4] != magic or len(header) < 4 + 4 * ndim:
                found = header[:4].hex(" ") if len(header) >= 4 else f"a file of {len(header)} byte(s)"
                raise DataError(
                    f"{path} is not an {kind} ({what}): expected the magic number {magic.hex(' ')} and "
                    f"{ndim} dimension(s) in the header, found {found}{' and a cut header' if header[:4] == magic else ''}"
                    f"; check that this is the right file, else {_REFETCH}"
                )
            dims = tuple(int(d) for d in np.frombuffer(header, dtype=">u4", count=ndim, offset=4))
            expected = int(np.prod(dims, dtype=object))
            body = _read_upto(f, expected + 1)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"cannot read {path} as a {kind} ({what}): {type(exc).__name__}: {exc}; expected a complete "
            f"{'gzip stream' if gz else 'file'}: the file is truncated or corrupt, {_REFETCH}"
        ) from None
    if len(body) != expected:
        found = f"only {len(body)}" if len(body) < expected else "more than that"
        raise DataError(f"{path}: its header announces {what} of shape {dims}, i.e. {expected} bytes of data, but "
                        f"{found} follow: the file is truncated or corrupt, {_REFETCH}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


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
    found = [(d, pair) for d in (raw, root) if (pair := _find_idx_pair(d, train)) is not None]
    if not found and download:
        import torchvision  # lazy: only to download

        try:  # downloads (checking torchvision's md5 sums) into ROOT/<cls>/raw and unpacks the IDX files there
            getattr(torchvision.datasets, cls)(str(root), train=train, download=True)
        except Exception as exc:  # noqa: BLE001 - torchvision raises RuntimeError/URLError/OSError
            raise DataError(f"{name} ({split} split): torchvision could not download it: {exc}; "
                            f"{_idx_expectation(name, root, train)}") from exc
        found = [(raw, pair)] if (pair := _find_idx_pair(raw, train)) is not None else []
    if found:
        directory, (image_file, label_file) = found[0]
        images, labels = _read_idx(image_file, 3), _read_idx(label_file, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{image_file} holds {images.shape[0]} images but {label_file} holds "
                            f"{labels.shape[0]} labels; expected one label per image: one of the two files belongs "
                            f"to another data set or split, {_REFETCH}")
        how = " found via torchvision's layout" if directory == raw else ""
        log.info("loaded %s %s split from IDX files %s, %s%s", name, split, image_file, label_file, how)
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


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _cifar_batch(path: Path, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The ``(n, 3072)`` uint8 pixels and ``n`` int64 labels of the CIFAR-10 batch ``blob`` read from ``path``.

    Unpickled with :mod:`~qmlhfl_mpi.data.safe_pickle` (no code from the file
    runs); every departure from the format is a :class:`DataError` naming the file.
    """
    expect = (f"expected a CIFAR-10 python batch: a dict with 'data' (a uint8 array of shape (n, {_CIFAR_PIXELS})) "
              f"and 'labels' (n integers in 0..{_CIFAR_CLASSES - 1})")
    entry = safe_pickle.loads(blob, path)
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds {_describe(entry)}; {expect}; {_REFETCH}")
    fields = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    label_key = next((k for k in ("labels", "fine_labels") if k in fields), None)
    if "data" not in fields or label_key is None:
        lacks = [k for k, ok in (("data", "data" in fields), ("labels", label_key is not None)) if not ok]
        raise DataError(f"{path} lacks {lacks} (its keys: {sorted(map(str, fields))}); {expect}; {_REFETCH}")
    data, lab = fields["data"], fields[label_key]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise DataError(f"{path}: 'data' is {_describe(data)}; {expect}; {_REFETCH}")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu":
            raise DataError(f"{path}: 'data' is {_describe(data)}; {expect}; {_REFETCH}")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"{path}: 'data' is {_describe(data)} with values outside 0..255 (min {data.min()}, "
                            f"max {data.max()}); {expect}; {_REFETCH}")
        data = data.astype(np.uint8)
    if isinstance(lab, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in lab):
            bad = next(v for v in lab if not isinstance(v, (int, np.integer)) or isinstance(v, bool))
            raise DataError(f"{path}: {label_key!r} holds {bad!r} ({type(bad).__name__}); {expect}; {_REFETCH}")
        lab = np.array([int(v) for v in lab], dtype=object)
    if not isinstance(lab, np.ndarray) or lab.ndim != 1 or (lab.size and lab.dtype.kind not in "iuO"):
        raise DataError(f"{path}: {label_key!r} is {_describe(lab)}; {expect}; {_REFETCH}")
    if lab.shape[0] != data.shape[0]:
        raise DataError(f"{path}: 'data' holds {data.shape[0]} images but {label_key!r} {lab.shape[0]} labels; "
                        f"{expect}; {_REFETCH}")
    if lab.size and (lab.min() < 0 or lab.max() >= _CIFAR_CLASSES):
        raise DataError(f"{path}: {label_key!r} has labels outside 0..{_CIFAR_CLASSES - 1} "
                        f"(min {lab.min()}, max {lab.max()}); {expect}; {_REFETCH}")
    return data, lab.astype(np.int64)


def _load_cifar10(root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision  # lazy: for the download and the published checksums

    tv = torchvision.datasets.CIFAR10
    split = "train" if train else "test"
    base = root / _CIFAR_DIR
    needed = (_CIFAR_TRAIN if train else _CIFAR_TEST) + (_CIFAR_META,)

    def missing() -> list[str]:
        return [f for f in needed if not (base / f).is_file()]

    if missing() and not download:
        what = "incomplete" if base.is_dir() else "not found"
        raise DataError(f"cifar10 ({split} split) {what} under {root}: missing {missing()} in {base}; "
                        f"{_cifar_expectation(root)}")
    if missing():
        from torchvision.datasets.utils import download_and_extract_archive

        try:  # the archive's md5 is checked by torchvision; its batches are read below like any others
            download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
        except Exception as exc:  # noqa: BLE001 - download errors (URLError, OSError, RuntimeError)
            raise DataError(f"cifar10 ({split} split): download failed: {exc}; {_cifar_expectation(root)}") from exc
        if missing():
            raise DataError(f"cifar10 ({split} split): the download did not provide {missing()} in {base}; "
                            f"{_cifar_expectation(root)}")
    official = {name: md5 for name, md5 in (*tv.train_list, *tv.test_list)}
    data, labels, unofficial = [], [], []
    for fname in needed[:-1]:  # batches.meta (class names) is not needed
        path = base / fname
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read the CIFAR-10 batch {path}: {exc}") from None
        if hashlib.md5(blob, usedforsecurity=False).hexdigest() != official.get(fname):
            unofficial.append(fname)
        pixels, lab = _cifar_batch(path, blob)
        data.append(pixels)
        labels.append(lab)
    if unofficial:
        log.warning("cifar10: %s in %s fail torchvision's md5 check (not the official release?); read them "
                    "anyway (with the restricted unpickler)", unofficial, base)
    else:
        log.info("loaded cifar10 %s split from %s (the official release: checksums verified via torchvision; "
                 "read with the restricted unpickler)", split, base)
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC like torchvision
    return np.ascontiguousarray(images), np.concatenate(labels)


# --------------------------------------------------------------------------- #
def load_image_data(name: str, root: PathLike, train: bool, download: bool = False) -> ImageData:
    """Load split ``train``/test of ``name`` (one of :data:`IMAGE_DATASETS`) from ``root``.

    Raises :class:`DataError` naming the expected files when the root is
    missing, incomplete, truncated or malformed; downloads through torchvision
    only if ``download``.
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
