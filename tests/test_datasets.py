"""Image loaders on small generated files in torchvision's and Debian's layouts."""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qmlhfl_mpi.data.images import IMAGE_DATASETS, DataError, ImageData, load_image_data

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _make_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _write_idx_dir(directory: Path, gz: bool, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in splits.items():
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = directory / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(_idx_bytes(arr))
            else:
                name.write_bytes(_idx_bytes(arr))


@pytest.fixture()
def idx_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {"train": _make_split(rng, 30), "t10k": _make_split(rng, 12)}


def _check(data: ImageData, images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...]) -> None:
    assert isinstance(data, ImageData)
    assert len(data) == len(labels) and data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, labels)
    assert data.num_classes == 10 and data.input_shape == shape
    idx = np.array([3, 0, 7])
    x = data.images(idx)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, *shape)
    # undo the normalisation and compare with the raw pixels
    mean = torch.tensor(data._mean).view(1, -1, 1, 1)
    std = torch.tensor(data._std).view(1, -1, 1, 1)
    raw = images[idx] if images.ndim == 3 else images[idx].transpose(0, 3, 1, 2)
    restored = (x * std + mean) * 255.0
    np.testing.assert_allclose(restored.numpy().reshape(raw.shape), raw.astype(np.float32), atol=1e-3)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("train", [True, False])
def test_torchvision_idx_layout(tmp_path, idx_splits, name, folder, train, caplog):
    _write_idx_dir(tmp_path / folder / "raw", gz=False, splits=idx_splits)
    caplog.set_level(logging.INFO, logger="qmlhfl_mpi.data.images")
    data = load_image_data(name, str(tmp_path), train=train)
    images, labels = idx_splits["train" if train else "t10k"]
    _check(data, images, labels, (1, 28, 28))
    assert "via torchvision" in caplog.text


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_flat_gz_layout_like_debian(tmp_path, idx_splits, name, caplog):
    _write_idx_dir(tmp_path, gz=True, splits=idx_splits)
    caplog.set_level(logging.INFO, logger="qmlhfl_mpi.data.images")
    for train, key in ((True, "train"), (False, "t10k")):
        data = load_image_data(name, tmp_path, train=train)
        _check(data, *idx_splits[key], (1, 28, 28))
    assert "from IDX files" in caplog.text and "via torchvision" not in caplog.text
    assert not list(tmp_path.glob("*-ubyte")), "the gz files must not be unpacked to disk"


def test_gz_inside_torchvision_raw_folder(tmp_path, idx_splits):
    _write_idx_dir(tmp_path / "MNIST" / "raw", gz=True, splits={"train": idx_splits["train"]})
    data = load_image_data("mnist", tmp_path, train=True)
    _check(data, *idx_splits["train"], (1, 28, 28))
    assert len(data) == len(idx_splits["train"][1])


def _write_cifar(base: Path, n_per_batch: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    base.mkdir(parents=True)
    out = {}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        data, labels = [], []
        for fname in files:
            d = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            lab = [int(v) for v in rng.integers(0, 10, n_per_batch)]
            with open(base / fname, "wb") as f:
                pickle.dump({"batch_label": fname, "labels": lab, "data": d, "filenames": []}, f)
            data.append(d)
            labels.extend(lab)
        out[split] = (np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels))
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072, "num_cases_per_batch": 4}, f)
    return (*out["train"], *out["test"])


def test_cifar10_generated_batches_fall_back_to_pickles(tmp_path, caplog):
    tr_x, tr_y, te_x, te_y = _write_cifar(tmp_path / "cifar-10-batches-py")
    caplog.set_level(logging.INFO, logger="qmlhfl_mpi.data.images")
    train = load_image_data("cifar10", tmp_path, train=True)
    _check(train, tr_x, tr_y, (3, 32, 32))
    assert len(train) == 40
    test = load_image_data("cifar10", tmp_path, train=False)
    _check(test, te_x, te_y, (3, 32, 32))
    assert "md5" in caplog.text


def test_cifar10_through_torchvision_when_md5_matches(tmp_path, monkeypatch, caplog):
    import torchvision

    base = tmp_path / "cifar-10-batches-py"
    tr_x, tr_y, _, _ = _write_cifar(base)

    def md5(name: str) -> str:
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5("batches.meta")})
    caplog.set_level(logging.INFO, logger="qmlhfl_mpi.data.images")
    _check(load_image_data("cifar10", tmp_path, train=True), tr_x, tr_y, (3, 32, 32))
    assert "via torchvision" in caplog.text and "md5" not in caplog.text


@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_missing_root_names_expected_files(tmp_path, name):
    with pytest.raises(DataError) as err:
        load_image_data(name, tmp_path / "nowhere", train=True)
    msg = str(err.value)
    assert "nowhere" in msg and "data.download: true" in msg
    if name == "cifar10":
        assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "batches.meta" in msg
    else:
        assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte" in msg
        assert ("apt-get install dataset-fashion-mnist" in msg) == (name == "fashion-mnist")


def test_incomplete_idx_root_lists_what_is_there(tmp_path, idx_splits):
    _write_idx_dir(tmp_path, gz=True, splits={"train": idx_splits["train"]})
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="incomplete") as err:
        load_image_data("fashion-mnist", tmp_path, train=True)
    assert "train-labels-idx1-ubyte" in str(err.value)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):  # test split absent altogether
        load_image_data("fashion-mnist", tmp_path, train=False)


def test_incomplete_cifar_root(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    _write_cifar(base)
    (base / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"incomplete.*data_batch_3"):
        load_image_data("cifar10", tmp_path, train=True)


def test_corrupt_idx_file(tmp_path, idx_splits):
    _write_idx_dir(tmp_path, gz=True, splits={"train": idx_splits["train"]})
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(idx_splits["train"][0])[:-5])  # truncated
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_image_data("mnist", tmp_path, train=True)


def test_unknown_name_and_bad_indices(tmp_path, idx_splits):
    with pytest.raises(ValueError, match="svhn.*mnist"):
        load_image_data("svhn", tmp_path, train=True)
    _write_idx_dir(tmp_path, gz=True, splits={"train": idx_splits["train"]})
    data = load_image_data("mnist", tmp_path, train=True)
    with pytest.raises(ValueError, match=r"\[0, 29\]"):
        data.images(np.array([0, 30]))
    assert tuple(data.images(np.array([], dtype=np.int64)).shape) == (0, 1, 28, 28)


def test_real_debian_fashion_mnist():
    if not DEBIAN_FMNIST.is_dir():
        pytest.skip(f"{DEBIAN_FMNIST} not present (apt-get install dataset-fashion-mnist)")
    train = load_image_data("fashion-mnist", str(DEBIAN_FMNIST), train=True)
    test = load_image_data("fashion-mnist", str(DEBIAN_FMNIST), train=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.num_classes == 10 and train.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))
    x = train.images(np.arange(0, 60000, 6))
    assert tuple(x.shape) == (10000, 1, 28, 28)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05  # normalisation constants fit


def test_a_parsed_idx_file_is_kept_for_the_next_run_until_the_file_changes(tmp_path, idx_splits):
    from qmlhfl_mpi.data import images as images_mod

    _write_idx_dir(tmp_path, gz=True, splits={"train": idx_splits["train"]})
    first = load_image_data("fashion-mnist", tmp_path, train=True)
    hits = images_mod._parse_idx_cached.cache_info().hits
    again = load_image_data("fashion-mnist", tmp_path, train=True)
    assert images_mod._parse_idx_cached.cache_info().hits == hits + 2  # images and labels, not parsed again
    np.testing.assert_array_equal(again.labels, first.labels)
    flipped = (idx_splits["train"][0], (idx_splits["train"][1] + 1) % 10)  # same size, new content
    _write_idx_dir(tmp_path, gz=True, splits={"train": flipped})
    os.utime(tmp_path / "train-labels-idx1-ubyte.gz", ns=(1, 1))  # a new modification time, whatever the clock
    np.testing.assert_array_equal(load_image_data("fashion-mnist", tmp_path, train=True).labels, flipped[1])
