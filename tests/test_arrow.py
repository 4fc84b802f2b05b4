"""The ``arrow`` data set (data/arrow.py) in process: every on-disk layout gives the source arrays, each column
type decodes to its tensor, ``x[idx]`` decodes only the rows asked for, Arrow files stay memory-mapped, the
natural split follows the owner column, a run is bit-identical to the same arrays given through a plug-in, the
memory estimate counts it, and every mistake is a DataError that says what to do.  Multi-rank:
tests/mpi/test_arrow_mpi.py."""
from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pytest.importorskip("datasets")
import pyarrow.feather  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from datasets import Array2D, ClassLabel, Dataset, Features, Image, Sequence, Value, load_from_disk  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from arrow_plugin import arrays, write  # noqa: E402
from helpers import REPO, SMALL  # noqa: E402
from qmlhfl_mpi import RunError, Session, load_config  # noqa: E402
from qmlhfl_mpi.data import arrow as arrow_module  # noqa: E402
from qmlhfl_mpi.data.arrow import arrow  # noqa: E402
from qmlhfl_mpi.data.source import DataError, load_pooled, take  # noqa: E402

PLUGIN = f"{REPO / 'tests' / 'arrow_plugin.py'}:load"
COLS = {"features": "x", "label": "label", "owner": "owner"}


def self_comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


@pytest.fixture(scope="module")
def data():
    return arrays()


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):
    """The same data in every layout under one root; plus a few broken ones for the errors."""
    root = tmp_path_factory.mktemp("arrow")
    hf, _ = write(root, data)
    dd = load_from_disk(str(hf))
    train, test = dd["train"], dd["test"]
    train.save_to_disk(str(root / "single-train"), num_shards=2)
    test.save_to_disk(str(root / "single-test"))
    train.to_parquet(str(root / "train.parquet"))
    test.to_parquet(str(root / "test.parquet"))
    hub = root / "hub"  # the Hub's parquet layout: files named by split and shard
    hub.mkdir()
    half = len(train) // 2
    train.select(range(half)).to_parquet(str(hub / "train-00000-of-00002.parquet"))
    train.select(range(half, len(train))).to_parquet(str(hub / "train-00001-of-00002.parquet"))
    test.to_parquet(str(hub / "test-00000-of-00001.parquet"))
    cache = root / "cache"  # the HF cache's layout: <name>-<split>.arrow stream files
    cache.mkdir()
    shutil.copy(hf / "train" / "data-00000-of-00001.arrow", cache / "mydata-train.arrow")
    shutil.copy(hf / "test" / "data-00000-of-00001.arrow", cache / "mydata-test.arrow")
    pyarrow.feather.write_feather(pq.read_table(root / "train.parquet"), root / "train.feather")  # IPC file, lz4
    table = pq.read_table(root / "test.parquet")
    pq.write_table(table.slice(0, 0), root / "empty.parquet")
    wide = pa.table({"x": pa.array([[0.5] * 5] * 3, pa.list_(pa.float32(), 5)), "label": [0, 1, 2]})
    pq.write_table(wide, root / "wide.parquet")
    return root


def _all(x):
    return x[np.arange(x.shape[0])]


LAYOUTS = {
    "DatasetDict": {"path": "hf"},
    "save_to_disk + test_path": {"path": "single-train", "test_path": "single-test"},
    "parquet files": {"path": "train.parquet", "test_path": "test.parquet"},
    "Hub parquet directory": {"path": "hub"},
    "HF cache directory": {"path": "cache"},
    "feather + parquet": {"path": "train.feather", "test_path": "test.parquet"},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_source_arrays(store, data, layout):
    args = {**COLS, **LAYOUTS[layout]}
    x, y, owner = arrow(str(store), True, **args)
    tx, ty = arrow(str(store), False, **args)
    assert x.shape == data["train"][0].shape and tx.shape == data["test"][0].shape
    assert np.array_equal(_all(x), data["train"][0]) and np.array_equal(_all(tx), data["test"][0])
    assert y.dtype == np.int64 and np.array_equal(y, data["train"][1]) and np.array_equal(ty, data["test"][1])
    assert owner.dtype.kind == "U" and np.array_equal(owner, data["train"][2])
    pooled = load_pooled(arrow, "arrow", str(store), True, args)  # what the engine checks
    sample = take(pooled.x, np.array([3, 0, 3]))
    assert sample.dtype.is_floating_point and np.array_equal(sample.numpy(), data["train"][0][[3, 0, 3]])


def test_path_absolute_or_from_root_and_defaults(store, data, tmp_path):
    x, y = arrow("/nonexistent", True, path=str(store / "hf"), features="x")  # label defaults to "label"
    assert np.array_equal(_all(x), data["train"][0]) and np.array_equal(y, data["train"][1])
    x, _ = arrow(str(store / "hf"), False, path="test", features=["x"], label="label", test_path=".")
    assert np.array_equal(_all(x), data["test"][0])  # a save_to_disk split directory as test_path


def _mixed(tmp_path):
    rows = 5
    rng = np.random.default_rng(1)
    a2 = rng.normal(size=(rows, 2, 3)).astype(np.float32)
    cols = {
        "f_float": rng.normal(size=rows), "f_int": np.arange(rows, dtype=np.int32) - 2,
        "v": rng.normal(size=(rows, 3)).astype(np.float32), "var": rng.normal(size=(rows, 2)),
        "a2": a2, "nest": rng.normal(size=(rows, 2, 2)), "ragged": [[1.0] * (1 + i % 2) for i in range(rows)],
        "flag": [True, False] * 2 + [True], "name": list("abcde"), "lab_neg": [0, 1, -1, 2, 0],
        "lab_str": list("xyzxy"), "lab_float": rng.normal(size=rows).astype(np.float32),
        "label": [0, 1, 2, 1, 0], "owner_int": [7, 3, 7, 3, 5], "owner_float": [1.0] * rows,
    }
    features = Features({
        "f_float": Value("float64"), "f_int": Value("int32"), "v": Sequence(Value("float32"), length=3),
        "var": Sequence(Value("float64")), "a2": Array2D((2, 3), "float32"), "nest": Sequence(Sequence(Value("float64"))),
        "ragged": Sequence(Value("float64")), "flag": Value("bool"), "name": Value("string"),
        "lab_neg": Value("int64"), "lab_str": Value("string"), "lab_float": Value("float32"),
        "label": ClassLabel(num_classes=3), "owner_int": Value("int64"), "owner_float": Value("float64"),
    })
    Dataset.from_dict({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in cols.items()},
                      features=features).save_to_disk(str(tmp_path / "mixed"))
    return cols


def test_column_types_decode_to_their_tensors(tmp_path):
    cols = _mixed(tmp_path)
    args = {"path": "mixed", "label": "label"}
    x, y = arrow(str(tmp_path), True, features=["f_float", "f_int", "v", "var"], **args)
    expect = np.concatenate([cols["f_float"][:, None], cols["f_int"][:, None], cols["v"], cols["var"]], axis=1)
    assert x.shape == (5, 7) and np.array_equal(_all(x), expect.astype(np.float32))
    assert np.array_equal(y, [0, 1, 2, 1, 0])  # a ClassLabel
    x, _ = arrow(str(tmp_path), True, features="a2", **args)  # HF Array2D
    assert x.shape == (5, 2, 3) and np.array_equal(_all(x), cols["a2"])
    x, _ = arrow(str(tmp_path), True, features="nest", **args)  # nested lists of one shape
    assert x.shape == (5, 2, 2) and np.array_equal(_all(x), cols["nest"].astype(np.float32))
    _, y = arrow(str(tmp_path), True, path="mixed", features="v", label="lab_float")
    assert y.dtype == np.float32 and np.array_equal(y, cols["lab_float"])  # regression targets
    _, _, owner = arrow(str(tmp_path), True, features="v", owner="owner_int", **args)
    assert owner.dtype == np.int64 and owner.tolist() == [7, 3, 7, 3, 5]


def _images(tmp_path, sizes=((5, 4),) * 4, mode="RGB"):
    rng = np.random.default_rng(2)
    bands = len(mode)
    pixels = [rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8) for w, h in sizes]
    imgs = [PILImage.fromarray(p[..., 0] if bands == 1 else p, mode) for p in pixels]
    ds = Dataset.from_dict({"img": imgs, "label": list(range(len(imgs))), "f": [1.0] * len(imgs)},
                           features=Features({"img": Image(), "label": Value("int64"), "f": Value("float32")}))
    ds.save_to_disk(str(tmp_path / "images"))
    return [p.transpose(2, 0, 1).astype(np.float32) / 255 for p in pixels]


def test_an_image_column_decodes_to_chw_in_0_1_and_only_the_rows_asked_for(tmp_path, monkeypatch):
    expect = _images(tmp_path)
    x, y = arrow(str(tmp_path), True, path="images", features="img")
    assert x.shape == (4, 3, 4, 5) and y.tolist() == [0, 1, 2, 3]
    opened = []
    real = arrow_module._open_image
    monkeypatch.setattr(arrow_module, "_open_image", lambda *a: opened.append(a[4]) or real(*a))
    out = x[np.array([3, 1])]
    assert opened == [3, 1]  # two images decoded, no others
    assert out.dtype == np.float32 and np.array_equal(out, np.stack([expect[3], expect[1]]))
    assert 0 <= out.min() and out.max() <= 1


def test_grayscale_images_and_images_by_path(tmp_path):
    expect = _images(tmp_path, mode="L")
    x, _ = arrow(str(tmp_path), True, path="images", features="img")
    assert x.shape == (4, 1, 4, 5) and np.array_equal(_all(x), np.stack(expect))
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    PILImage.fromarray(pixels, "L").save(tmp_path / "a.png")
    cells = pa.array([{"bytes": None, "path": "a.png"}] * 2,
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": cells, "label": [0, 1]}), tmp_path / "paths.parquet")
    x, _ = arrow(str(tmp_path), True, path="paths.parquet", features="img")  # relative to the file's directory
    assert x.shape == (2, 1, 3, 4) and np.array_equal(x[np.array([1])][0, 0], pixels / np.float32(255))


def test_x_of_idx_takes_only_the_rows_asked_for(store, data):
    x, _, _ = arrow(str(store), True, path="hf", **COLS)
    taken = []
    table = x._table

    class Spy:
        num_rows = table.num_rows

        def take(self, rows):
            taken.append(rows.tolist())
            return table.take(rows)

    x._table = Spy()
    idx = np.array([5, 2, 5, 0])
    assert np.array_equal(x[idx], data["train"][0][idx])
    assert taken == [[5, 2, 5, 0]]
    assert x[np.array([], dtype=np.int64)].shape == (0, 6)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 59\]"):
        x[np.array([60])]


def test_arrow_files_stay_memory_mapped_and_parquet_columns_are_read(tmp_path):
    n, dim = 2000, 256
    feats = np.random.default_rng(3).normal(size=(n, dim)).astype(np.float32)
    ds = Dataset.from_dict({"x": feats, "label": np.zeros(n, dtype=np.int64)},
                           features=Features({"x": Sequence(Value("float32"), length=dim), "label": Value("int64")}))
    ds.save_to_disk(str(tmp_path / "big"))
    ds.to_parquet(str(tmp_path / "big.parquet"))
    before = pa.total_allocated_bytes()
    x, y = arrow(str(tmp_path), True, path="big", features="x")
    mapped = pa.total_allocated_bytes() - before
    assert mapped < feats.nbytes / 8, mapped  # the features stay in the file's pages
    assert np.array_equal(x[np.array([1999, 7])], feats[[1999, 7]])
    before = pa.total_allocated_bytes()
    px, _ = arrow(str(tmp_path), True, path="big.parquet", features="x")
    assert pa.total_allocated_bytes() - before >= feats.nbytes  # Parquet: the decompressed column is in memory
    assert np.array_equal(px[np.array([3])], feats[[3]])
    del x, px


# --------------------------------------------------------------------------- through the engine
def _raw(tmp_path, data_section, name):
    raw = copy.deepcopy(SMALL)
    raw["data"] = data_section
    raw["output"] = {"path": str(tmp_path / f"{name}.h5")}
    return raw


def _arrow_data(store, **args):
    return {"name": "arrow", "root": str(store), "args": {**COLS, "path": "hf", **args}, "partition": {"kind": "natural"}}


def _result(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("model/final", "metrics/train_loss", "metrics/test_loss",
                                      "metrics/test_accuracy", "topology/samples")}


def test_natural_split_over_the_owner_column(store, data, tmp_path):
    session = Session(load_config(_raw(tmp_path, _arrow_data(store), "natural")), self_comm())
    owner = data["train"][2]
    ids, inverse = np.unique(owner, return_inverse=True)  # sorted owner j -> device floor(j D / O)
    device = (np.arange(ids.size) * 6 // ids.size)[inverse]
    assert session.data.samples.tolist() == np.bincount(device, minlength=6).tolist()
    for k, (xk, yk) in session.data.train.items():
        rows = np.flatnonzero(device == k)
        assert np.array_equal(xk.numpy(), data["train"][0][rows]) and np.array_equal(yk.numpy(), data["train"][1][rows])


def test_a_run_is_bit_identical_to_the_same_arrays_from_a_plugin(store, tmp_path):
    npz = store / "arrays.npz"
    plugin = {"name": PLUGIN, "args": {"path": str(npz)}, "partition": {"kind": "natural"}}
    for name, section in (("arrow", _arrow_data(store)), ("plugin", plugin)):
        assert Session(load_config(_raw(tmp_path, section, name)), self_comm()).run().status == "completed"
    a, b = _result(tmp_path / "arrow.h5"), _result(tmp_path / "plugin.h5")
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert np.isfinite(a["metrics/train_loss"]).all()


def test_the_memory_estimate_counts_rows_labels_and_owners(store, data, tmp_path):
    from qmlhfl_mpi.config.sizing import sizing

    n_train, n_test, dim = len(data["train"][1]), len(data["test"][1]), data["train"][0].shape[1]
    s = sizing(load_config(_raw(tmp_path, _arrow_data(store), "m")), 2)
    assert s.pooled and s.samples_per_device == n_train / 6
    assert s.pooled_bytes == 8 * (n_train + n_test) + 8 * n_train + 4 * dim * -(-n_test // 2)
    assert any("page cache" in note for note in s.notes)
    s = sizing(load_config(_raw(tmp_path, _arrow_data(store, path="hub"), "m")), 2)
    assert s.pooled_bytes > 8 * (n_train + n_test) + 8 * n_train + 4 * dim * (n_train + n_test)  # Parquet: in memory


# --------------------------------------------------------------------------- mistakes
ERRORS = {
    "missing path": ({"path": "nope"}, True, r"data.args.path='nope': '.*/nope' does not exist \(relative paths are "
                                              r"taken from data.root='.*'\)"),
    "no path": ({"path": None}, True, r"data.args.path is required"),
    "unknown feature": ({"features": ["x", "pixels"]}, True,
                        r"no column 'pixels' \(data.args.features\); the columns are: x \(fixed_size_list.*label "
                        r"\(int64\), owner \(string\)"),
    "unknown label": ({"label": "y"}, True, r"no column 'y' \(data.args.label\); the columns are"),
    "owner missing": ({"owner": "writer"}, True, r"no column 'writer' \(data.args.owner\)"),
    "string feature": ({"features": "owner", "owner": None}, True,
                       r"feature column 'owner' has the type string.*encode it as numbers"),
    "label is a feature": ({"features": ["x", "label"]}, True, r"label column 'label' is also in data.args.features"),
    "no test split": ({"path": "single-train"}, False,
                      r"'.*single-train' is one data set .*no 'test' split.*data.args.test_path.*test_split"),
    "DatasetDict without the split": ({"test_split": "validation"}, False,
                                      r"splits \['train', 'test'\] but no 'validation'; set data.args.test_split"),
    "Hub directory without the split": ({"path": "hub", "train_split": "training"}, True,
                                        r"files of the split\(s\) \['test', 'train'\].*none of 'training'; set "
                                        r"data.args.train_split"),
    "empty split": ({"path": "train.parquet", "test_path": "empty.parquet"}, False, r"empty split \(0 rows\)"),
    "different shapes": ({"path": "train.parquet", "test_path": "wide.parquet", "owner": None}, False,
                         r"shape \(5,\) in the test split \(.*wide.parquet\) but \(6,\) in the training split"),
    "unknown key": ({"lable": "y"}, True, r"unknown data.args \['lable'\]; the keys are path, features"),
    "download": ({"download": True}, True, r"nothing is downloaded"),
    "bad features": ({"features": []}, True, r"data.args.features must be a column name or a non-empty list"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_mistakes_are_data_errors_that_say_what_to_do(store, case):
    args, train, message = ERRORS[case]
    with pytest.raises(DataError, match=message):
        arrow(str(store), train, **{**COLS, "path": "hf", **args})


MIXED_ERRORS = {
    "bool feature": ({"features": "flag"}, r"'flag' has the type bool.*cast it to integers"),
    "negative label": ({"features": "v", "label": "lab_neg"},
                       r"label column 'lab_neg' holds the negative value -1 \(row 2\); class labels must be 0, 1"),
    "string label": ({"features": "v", "label": "lab_str"},
                     r"label column 'lab_str' has the non-numeric type string \(e.g. 'x'\).*class_encode_column"),
    "float owner": ({"features": "v", "owner": "owner_float"}, r"owner column 'owner_float' has the type double"),
    "ragged lists": ({"features": "ragged"}, r"'ragged' holds lists of different lengths \(1 in the first, 2 in row 1\)"),
    "2-D with others": ({"features": ["a2", "v"]}, r"column 'a2' has rows of shape \(2, 3\); a column with more than one "
                                                   r"dimension must be the only feature"),
}


@pytest.mark.parametrize("case", list(MIXED_ERRORS))
def test_bad_columns_are_data_errors(tmp_path, case):
    _mixed(tmp_path)
    args, message = MIXED_ERRORS[case]
    with pytest.raises(DataError, match=message):
        arrow(str(tmp_path), True, **{"path": "mixed", "label": "label", **args})


def test_bad_images_are_data_errors(tmp_path):
    _images(tmp_path, sizes=((5, 4), (5, 4), (6, 4)))
    with pytest.raises(DataError, match=r"mixes the image column 'img' with other columns"):
        arrow(str(tmp_path), True, path="images", features=["img", "f"])
    x, _ = arrow(str(tmp_path), True, path="images", features="img")
    assert x[np.array([0, 1])].shape == (2, 3, 4, 5)
    with pytest.raises(DataError, match=r"image in row 2 is 6x4 \(width x height\) but the first image 5x4.*resize"):
        x[np.array([2])]


def test_without_pyarrow_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"needs pyarrow.*pip install 'qmlhfl_mpi\[arrow\]'"):
        arrow("data", True, path="x", features="x")


def test_a_bad_arrow_config_stops_the_session_with_the_message(store, tmp_path):
    raw = _raw(tmp_path, _arrow_data(store, path="nope"), "bad")
    with pytest.raises(RunError, match=r"'.*/nope' does not exist") as err:
        Session(load_config(raw), self_comm())
    assert err.value.code == 2 and not Path(raw["output"]["path"]).exists()
