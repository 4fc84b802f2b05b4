"""No code runs from data files, and damaged data files fail fast and clearly.

* CIFAR-10 batches are unpickled by :mod:`qmlhfl_mpi.data.safe_pickle`: real
  (Python 2) and Python 3 batches load; a batch whose pickle would run code
  is refused with a ``DataError`` naming the file, on the md5-mismatch path and
  on the path where the checksums match torchvision's, and the code never runs.
* Truncated or malformed IDX files, CIFAR batches and plug-in results are a
  ``DataError`` naming the file (or data set) and what was expected, in-process
  and under ``mpiexec -n 2`` (exit 2 within seconds, one message, no traceback).
* ``src/`` uses no ``pickle``/``torch.load``/``yaml.load``/``eval``/``exec``
  beyond the audited places listed in :data:`ALLOWED`.

Every file is generated in ``tmp_path``; nothing is downloaded.
"""
from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import textwrap
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import REPO, run_cli, small_config
from qmlhfl_mpi.data import safe_pickle
from qmlhfl_mpi.data.images import load_image_data
from qmlhfl_mpi.data.source import DataError, load_pooled

FAST = 20  # seconds for a failing run under mpiexec -n 2 (Python start-up of two ranks plus the check)
CIFAR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


# --------------------------------------------------------------------------- #
# writers of small data files in the real formats
# --------------------------------------------------------------------------- #
def _py2_pickle(obj: Any) -> bytes:
    """``obj`` pickled the way Python 2's cPickle (protocol 2) wrote CIFAR-10's release: ``str`` as
    BINSTRING opcodes and arrays through ``numpy.core.multiarray._reconstruct``."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)

    def write(o: Any) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                write(k)
                write(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                write(v)
            out.extend(b"e")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, str):
            string(o.encode("latin1"))
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            string(b"b")
            out.extend(b"\x87R(K\x01(")  # REDUCE; the state: (1, shape, dtype, fortran, data)
            for d in o.shape:
                write(int(d))
            out.extend(b"tcnumpy\ndtype\n")
            string(b"u1")
            out.extend(b"K\x00K\x01\x87R(K\x03")
            string(b"|")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    write(obj)
    return bytes(out + b".")


def _batch(rng: np.random.Generator, n: int, name: str) -> dict[str, Any]:
    return {"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{name}_{i}.png" for i in range(n)]}


def _dump(batch: dict[str, Any], protocol: int | str) -> bytes:
    if protocol == "py2":
        return _py2_pickle(batch)
    as_bytes = {k.encode(): v for k, v in batch.items()}  # keys as Python 3 reads the release with encoding="bytes"
    return pickle.dumps(as_bytes, protocol=int(protocol))


def write_cifar(root: Path, protocol: int | str = "py2", n: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A CIFAR-10 root with tiny batches; returns the expected (HWC images, labels) per split."""
    base = root / CIFAR
    base.mkdir(parents=True)
    rng = np.random.default_rng(5)
    expected = {}
    for split, files in (("train", TRAIN_BATCHES), ("test", ["test_batch"])):
        batches = [_batch(rng, n, f) for f in files]
        for f, b in zip(files, batches):
            (base / f).write_bytes(_dump(b, protocol))
        data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        expected[split] = data, np.concatenate([b["labels"] for b in batches])
    (base / "batches.meta").write_bytes(_dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072,
                                               "num_cases_per_batch": n}, protocol))
    return expected


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(root: Path, n_train: int = 12, n_test: int = 6) -> None:
    """Fashion-MNIST as Debian installs it: gzipped IDX files directly in the root."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(arr), mtime=0))


# --------------------------------------------------------------------------- #
# the restricted unpickler
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_cifar_batches_load_through_the_restricted_unpickler(tmp_path, protocol):
    expected = write_cifar(tmp_path, protocol)
    for train, split in ((True, "train"), (False, "test")):
        data = load_image_data("cifar10", tmp_path, train=train)
        assert data.input_shape == (3, 32, 32) and len(data) == len(expected[split][1])
        np.testing.assert_array_equal(data.labels, expected[split][1])
        np.testing.assert_array_equal(data._pixels, expected[split][0])


def test_allowed_globals_are_numpy_reconstruction_only():
    modules = {m for m, _ in safe_pickle.ALLOWED_GLOBALS}
    assert modules <= {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                       "numpy._core.numeric", "_codecs"}
    assert ("builtins", "eval") not in safe_pickle.ALLOWED_GLOBALS
    arrays = {"f": np.arange(6, dtype=">f8").reshape(2, 3, order="F"), "s": np.int64(7), "b": np.array([True])}
    for protocol in range(6):
        out = safe_pickle.loads(pickle.dumps(arrays, protocol=protocol), "x.pkl")
        assert out["f"].dtype == np.dtype(">f8") and np.array_equal(out["f"], arrays["f"])
        assert out["s"] == 7 and out["b"].dtype == bool
    # numpy's own dtype.__setstate__ would mark uint8 as holding objects (flags 63); here the flags are ignored
    forged = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01K\x02\x85"
              b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb\x89U\x02ab"
              b"tb.")
    out = safe_pickle.loads(forged, "forged.pkl")
    assert out.dtype == np.uint8 and not out.dtype.hasobject and out.tolist() == [97, 98]


class _System:
    """Unpickling it runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (self.command,)


class _Open:
    """Unpickling it runs ``builtins.open(path, "w")``: creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return builtins.open, (self.path, "w")


def _evil(kind: str, marker: Path) -> Any:
    return _System(f"touch {marker}") if kind == "system" else _Open(marker)


def test_the_payload_really_runs_code_with_plain_pickle(tmp_path):
    """Guards the tests below: the malicious batch does create its marker when unpickled normally."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps({b"data": _evil("open", marker), b"labels": []}))
    assert marker.exists()


@pytest.mark.parametrize("kind,refused", [("system", "posix.system"), ("open", "io.open")])  # builtins.open is io.open
@pytest.mark.parametrize("where", ["data", "labels", "top"])
def test_a_batch_that_would_run_code_is_refused(tmp_path, kind, refused, where):
    write_cifar(tmp_path)
    marker = tmp_path / "MARKER"
    bad = tmp_path / CIFAR / "data_batch_2"
    batch: Any = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}
    if where == "top":
        batch = _evil(kind, marker)
    else:
        batch[where.encode()] = _evil(kind, marker) if where == "data" else [0, _evil(kind, marker), 2]
    bad.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError) as err:
        load_image_data("cifar10", tmp_path, train=True)
    msg = str(err.value)
    assert str(bad) in msg and refused in msg and "run code" in msg
    assert not marker.exists()


def test_a_matching_checksum_does_not_make_a_batch_trusted(tmp_path, monkeypatch):
    """Even when every file matches the checksums torchvision knows, no code from a batch runs."""
    import torchvision

    write_cifar(tmp_path)
    base, marker = tmp_path / CIFAR, tmp_path / "MARKER"
    (base / "data_batch_1").write_bytes(pickle.dumps({b"data": _evil("system", marker), b"labels": []}))

    def md5(name: str) -> str:
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5("batches.meta")})
    with pytest.raises(DataError, match="refused to load the global posix.system") as err:
        load_image_data("cifar10", tmp_path, train=True)
    assert str(base / "data_batch_1") in str(err.value)
    assert not marker.exists()


def _ops(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


@pytest.mark.parametrize("payload,message", [
    # _reconstruct of something that is not numpy.ndarray
    (_ops(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R"), "only numpy.ndarray"),
    # NEWOBJ on a stand-in (not a class)
    (_ops(b"cnumpy\ndtype\n)\x81"), "not a pickle"),
    # BUILD setting an attribute on a stand-in
    (_ops(b"cnumpy\ndtype\nN}U\x03_fnK\x01s\x86b"), "cannot set '_fn'"),
    # object, string and structured dtypes
    (pickle.dumps(np.array([object()], dtype=object), protocol=2), "only plain numeric dtypes"),
    (pickle.dumps(np.array(["a"]), protocol=4), "only plain numeric dtypes"),
    (pickle.dumps(np.zeros(2, dtype=[("a", "<i4")]), protocol=5), "only plain numeric dtypes"),
    # a forged dtype state (numpy would accept the object flag on uint8)
    (_ops(b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NU\x01aNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb"),
     "no sub-arrays or fields"),
    # array data of the wrong length, a persistent id, a bytes encoding other than latin1
    (_ops(b"cnumpy._core.numeric\n_frombuffer\n(C\x03abccnumpy\ndtype\nU\x02u2K\x00K\x01\x87RK\x02\x85U\x01CtR"),
     "needs 4 bytes of data, the file holds 3"),
    (_ops(b"U\x01xQ"), "persistent id"),
    (_ops(b"c_codecs\nencode\nX\x01\x00\x00\x00xU\x06rot_13\x86R"), "only encode(str, 'latin1')"),
    (pickle.dumps({"a": [1, 2, 3]})[:-4], "truncated"),
    (b"not a pickle at all", "corrupt or not a pickle"),
])
def test_hostile_pickles_are_refused(payload, message):
    with pytest.raises(DataError, match=re.escape(message)) as err:
        safe_pickle.loads(payload, "/data/x.pkl")
    assert "/data/x.pkl" in str(err.value)


# --------------------------------------------------------------------------- #
# damaged files: in-process
# --------------------------------------------------------------------------- #
def _rewrite_gz(path: Path, edit: Callable[[bytes], bytes]) -> None:
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes())), mtime=0))


def _flip_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 8]) + data[mid + 8:]


IDX_DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "cut-gz": ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
               "truncated or corrupt"),
    "corrupt-gz": ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(_flip_middle(p.read_bytes())),
                   "truncated or corrupt"),
    "not-gzip": ("train-labels-idx1-ubyte.gz", lambda p: p.write_bytes(b"<html>404 Not Found</html>"),
                 "expected a complete gzip stream"),
    "empty": ("train-images-idx3-ubyte.gz", lambda p: p.write_bytes(gzip.compress(b"")),
              "expected the magic number 00 00 08 03"),
    "wrong-magic": ("train-images-idx3-ubyte.gz", lambda p: _rewrite_gz(p, lambda b: b"\x00\x00\x08\x01" + b[4:]),
                    "expected the magic number 00 00 08 03"),
    "labels-as-images": ("train-images-idx3-ubyte.gz",
                         lambda p: p.write_bytes((p.parent / "train-labels-idx1-ubyte.gz").read_bytes()),
                         "expected the magic number 00 00 08 03"),
    "short-data": ("train-images-idx3-ubyte.gz", lambda p: _rewrite_gz(p, lambda b: b[:-100]),
                   "but only 9308 follow"),
    "long-data": ("train-labels-idx1-ubyte.gz", lambda p: _rewrite_gz(p, lambda b: b + b"\x01"),
                  "but more than that follow"),
    "count-mismatch": ("train-labels-idx1-ubyte.gz",
                       lambda p: p.write_bytes(gzip.compress(_idx_bytes(np.zeros(11, np.uint8)))),
                       "holds 12 images but"),
}


@pytest.mark.parametrize("case", sorted(IDX_DAMAGE))
def test_damaged_idx_files_name_the_file_and_the_expectation(tmp_path, case):
    name, damage, expected = IDX_DAMAGE[case]
    write_idx(tmp_path)
    damage(tmp_path / name)
    with pytest.raises(DataError) as err:
        load_image_data("fashion-mnist", tmp_path, train=True)
    msg = str(err.value)
    assert str(tmp_path / name) in msg and expected in msg, msg
    load_image_data("fashion-mnist", tmp_path, train=False)  # the other split is intact


def test_damaged_idx_file_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw)
    for p in raw.glob("*.gz"):
        p.with_suffix("").write_bytes(gzip.decompress(p.read_bytes()))
        p.unlink()
    bad = raw / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])
    assert len(load_image_data("mnist", tmp_path, train=True)) == 12
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_image_data("mnist", tmp_path, train=False)
    assert str(bad) in str(err.value)


def _cifar_edit(edit: Callable[[dict[bytes, Any]], Any]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        batch = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}
        path.write_bytes(pickle.dumps(edit(batch), protocol=2))
    return damage


CIFAR_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "cut": (lambda p: p.write_bytes(p.read_bytes()[:-500]), "is truncated"),
    "garbage": (lambda p: p.write_bytes(b"\x00" * 64), "corrupt or not a pickle"),
    "not-a-dict": (_cifar_edit(lambda b: [b[b"data"], b[b"labels"]]), "holds a list"),
    "no-labels": (_cifar_edit(lambda b: {b"data": b[b"data"]}), "lacks ['labels']"),
    "no-data": (_cifar_edit(lambda b: {b"labels": b[b"labels"]}), "lacks ['data']"),
    "data-shape": (_cifar_edit(lambda b: {**b, b"data": np.zeros((3, 3071), np.uint8)}),
                   "'data' is an array of shape (3, 3071)"),
    "data-list": (_cifar_edit(lambda b: {**b, b"data": [[0] * 3072] * 3}), "'data' is a list"),
    "data-float": (_cifar_edit(lambda b: {**b, b"data": np.full((3, 3072), 0.5)}), "dtype float64"),
    "data-range": (_cifar_edit(lambda b: {**b, b"data": np.full((3, 3072), 256, np.int16)}), "values outside 0..255"),
    "labels-range": (_cifar_edit(lambda b: {**b, b"labels": [0, 10, 2]}), "labels outside 0..9"),
    "labels-negative": (_cifar_edit(lambda b: {**b, b"labels": np.array([0, -1, 2])}), "labels outside 0..9"),
    "labels-count": (_cifar_edit(lambda b: {**b, b"labels": [0, 1]}), "holds 3 images but 'labels' 2 labels"),
    "labels-str": (_cifar_edit(lambda b: {**b, b"labels": ["0", "1", "2"]}), "holds '0' (str)"),
    "labels-2d": (_cifar_edit(lambda b: {**b, b"labels": np.zeros((3, 1), np.int64)}),
                  "'labels' is an array of shape (3, 1)"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_DAMAGE))
def test_damaged_cifar_batches_name_the_file_and_the_expectation(tmp_path, case):
    damage, expected = CIFAR_DAMAGE[case]
    write_cifar(tmp_path)
    bad = tmp_path / CIFAR / "data_batch_4"
    damage(bad)
    with pytest.raises(DataError) as err:
        load_image_data("cifar10", tmp_path, train=True)
    msg = str(err.value)
    assert str(bad) in msg and expected in msg, msg
    if case not in ("cut", "garbage"):
        assert "expected a CIFAR-10 python batch" in msg
    assert len(load_image_data("cifar10", tmp_path, train=False)) == 3


X = np.zeros((10, 4), np.float32)
Y = np.zeros(10, np.int64)
PLUGIN_DAMAGE: dict[str, tuple[tuple[Any, ...], str]] = {
    "x-y-lengths": ((X, Y[:9]), r"y must be 1-D with one entry per sample \(10\), got shape \(9,\)"),
    "y-2d": ((X, Y.reshape(10, 1)), r"y must be 1-D with one entry per sample \(10\), got shape \(10, 1\)"),
    "y-str": ((X, np.array(["a"] * 10)), "integer class labels or float targets, got dtype <U1"),
    "y-ragged": ((X, [[1], [1, 2]] * 5), "y cannot be converted to an array"),
    "x-1d": ((np.zeros(10, np.float32), Y), r"x must be an array of shape \(samples, \*input_shape\)"),
    "x-str": ((np.array([["a"] * 4] * 10), Y), "x must be numeric, got dtype <U1"),
    "x-object": ((np.array([[object()] * 4] * 10, dtype=object), Y), "x must be numeric, got dtype object"),
    "x-ragged-list": (([[1.0, 2.0], [1.0]] * 5, Y), "x cannot be converted to an array"),
    "x-none": ((None, Y), "x must be an array of shape"),
    "x-zero-width": ((np.zeros((10, 0), np.float32), Y), "every input dimension must be >= 1"),
    "x-nan": ((np.full((10, 4), np.nan, np.float32), Y), "x contains NaN or inf"),
    "x-bool-tensor": ((torch.zeros(10, 4, dtype=torch.bool), Y), "x must be numeric"),
    "x-inf-tensor": ((torch.full((10, 4), float("inf")), Y), "x contains NaN or inf"),
    "owner-length": ((X, Y, np.arange(9)), r"owner must be 1-D with one id per sample \(10\), got shape \(9,\)"),
    "owner-2d": ((X, Y, np.arange(10).reshape(10, 1)), r"owner must be 1-D .* got shape \(10, 1\)"),
    "owner-float": ((X, Y, np.linspace(0, 1, 10)), "owner ids must be integers or strings, got dtype float64"),
}


@pytest.mark.parametrize("case", sorted(PLUGIN_DAMAGE))
def test_a_plugin_returning_bad_arrays_is_a_data_error(case):
    result, message = PLUGIN_DAMAGE[case]
    with pytest.raises(DataError, match=message) as err:
        load_pooled(lambda root, train: result, "my.py:load", "data", True, {})
    assert "data set 'my.py:load' (train split)" in str(err.value)


def test_good_plugin_results_still_pass():
    pooled = load_pooled(lambda root, train: (torch.ones(10, 4), list(range(10)), [f"w{i % 3}" for i in range(10)]),
                         "ok", "data", True, {})
    assert pooled.input_shape == (4,) and pooled.y.dtype == np.int64 and pooled.owner is not None


# --------------------------------------------------------------------------- #
# damaged files under mpiexec -n 2
# --------------------------------------------------------------------------- #
def _run_fails_cleanly(tmp_path: Path, data: dict[str, Any], names: str) -> str:
    cfg = small_config(tmp_path, data=data, model={"name": "mlp", "args": {"hidden": 5}})
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet"], timeout=60)
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert secs < FAST, secs
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err
    assert names in err, err
    assert err.count(names) == 1, err  # one message, not one per rank
    assert not (tmp_path / "out.h5").exists()
    return err


def test_cut_gz_under_mpiexec(tmp_path):
    root = tmp_path / "fmnist"
    write_idx(root)
    bad = root / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-40])
    err = _run_fails_cleanly(tmp_path, {"name": "fashion-mnist", "root": str(root)}, str(bad))
    assert "truncated or corrupt" in err


def test_malicious_cifar_batch_under_mpiexec(tmp_path):
    root, marker = tmp_path / "cifar", tmp_path / "MARKER"
    write_cifar(root)
    bad = root / CIFAR / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": _evil("system", marker), b"labels": [1]}, protocol=2))
    err = _run_fails_cleanly(tmp_path, {"name": "cifar10", "root": str(root)}, str(bad))
    assert "refused to load the global posix.system" in err
    assert not marker.exists()


def test_plugin_with_wrong_shapes_under_mpiexec(tmp_path):
    plugin = tmp_path / "bad_data.py"
    plugin.write_text(textwrap.dedent("""
        import numpy as np

        def load(root, train):
            return np.zeros((12, 4), np.float32), np.zeros(11, np.int64)
    """))
    ref = f"{plugin}:load"
    err = _run_fails_cleanly(tmp_path, {"name": ref}, f"data set {ref!r} (train split)")
    assert "y must be 1-D with one entry per sample (12), got shape (11,)" in err


# --------------------------------------------------------------------------- #
# audit of src/: no unsafe deserialisation or dynamic code outside the listed places
# --------------------------------------------------------------------------- #
SRC = REPO / "src" / "qmlhfl_mpi"
#: (file relative to src/qmlhfl_mpi, construct) -> why it is allowed (see docs/security.md)
ALLOWED: dict[tuple[str, str], str] = {
    ("data/safe_pickle.py", "import pickle"): "the restricted unpickler: the only pickle user",
    ("data/safe_pickle.py", "pickle.Unpickler"): "subclassed with a find_class that admits numpy arrays only",
    ("data/safe_pickle.py", "pickle.PickleBuffer"): "type check of protocol-5 buffers",
    ("core/registry.py", "exec_module"): "plug-ins (file.py:attr) are the user's code, run by design",
    ("core/registry.py", "import_module"): "plug-ins (package.module:attr) are the user's code, run by design",
    ("__init__.py", "import_module"): "lazy exports of the package's own modules (fixed names)",
}
_PICKLE_LIKE = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
_YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader",
                "UnsafeLoader", "FullLoader"}


def _call_args(toks: list[tokenize.TokenInfo], i: int) -> str:
    """The source text of the call whose "(" is toks[i], up to its closing parenthesis."""
    depth, parts = 0, []
    for t in toks[i:]:
        depth += t.string == "("
        depth -= t.string == ")"
        parts.append(t.string)
        if depth == 0:
            break
    return "".join(parts)


def _findings(path: Path) -> list[tuple[str, int]]:
    """(construct, line) of every risky use in ``path``; strings and comments are skipped."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            if t.type in (tokenize.NAME, tokenize.OP, tokenize.STRING, tokenize.NUMBER)]
    out = []
    for i, t in enumerate(toks):
        prev = toks[i - 1].string if i else ""
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        attr = toks[i + 2].string if i + 2 < len(toks) and nxt == "." else ""
        call = i + 3 < len(toks) and toks[i + 3].string == "("
        if t.string in ("import", "from") and nxt in _PICKLE_LIKE:
            out.append((f"import {nxt}", t.start[0]))
        elif t.string in _PICKLE_LIKE and nxt == "." and prev != ".":
            out.append((f"{t.string}.{attr}", t.start[0]))
        elif t.string == "torch" and attr == "load" and not (call and "weights_only=True" in _call_args(toks, i + 3)):
            out.append(("torch.load without weights_only=True", t.start[0]))
        elif t.string in ("np", "numpy") and attr == "load" and call and "allow_pickle=True" in _call_args(toks, i + 3):
            out.append(("np.load(allow_pickle=True)", t.start[0]))
        elif t.string == "yaml" and attr in _YAML_UNSAFE:
            out.append((f"yaml.{attr}", t.start[0]))
        elif t.string in ("eval", "exec", "compile", "__import__") and nxt == "(" and prev != ".":
            if not (t.string == "__import__" and i + 2 < len(toks) and toks[i + 2].string in ('"types"', "'types'")):
                out.append((f"{t.string}(", t.start[0]))
        elif t.string in ("exec_module", "import_module", "run_path", "run_module") and prev == ".":
            out.append((t.string, t.start[0]))
    return out


def test_src_has_no_unsafe_deserialisation_or_dynamic_code():
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for what, line in _findings(path):
            found.setdefault((rel, what), []).append(line)
    unexpected = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not unexpected, (f"risky constructs not listed in ALLOWED (and docs/security.md): {unexpected}; use "
                            "data/safe_pickle.py, torch.load(weights_only=True), yaml.safe_load")
    assert set(found) == set(ALLOWED), f"ALLOWED lists constructs no longer found: {set(ALLOWED) - set(found)}"


def test_security_doc_lists_the_allowed_places():
    doc = (REPO / "docs" / "security.md").read_text()
    for rel, _ in ALLOWED:
        assert rel in doc, f"docs/security.md does not mention {rel}"
    assert "safe_pickle" in doc and "yaml.safe_load" in doc and "weights_only=True" in doc


def test_scanner_sees_through_strings_but_not_code(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent('''
        """pickle.loads(x) and eval(s) in a docstring are fine"""
        import pickle  # flagged
        import torch, yaml
        x = pickle.loads(b"")
        torch.load("f")
        torch.load("f", weights_only=True)
        yaml.load("a")
        yaml.safe_load("a")
        eval("1")
        model.eval()
    '''))
    assert sorted(w for w, _ in _findings(probe)) == sorted(
        ["import pickle", "pickle.loads", "torch.load without weights_only=True", "yaml.load", "eval("])
