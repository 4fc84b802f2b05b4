"""A data-set plug-in that hands out numpy arrays saved in an ``.npz`` file: the same data as an ``arrow``
data set, given the plain way, for the bit-identity checks of tests/test_arrow.py and
tests/mpi/test_arrow_mpi.py.

    data: {name: tests/arrow_plugin.py:load, args: {path: FILE.npz}}

The file holds ``train_x, train_y, train_owner, test_x, test_y``."""
from __future__ import annotations

import numpy as np


def load(root, train, path):
    del root
    with np.load(path) as f:
        split = "train" if train else "test"
        x, y = f[f"{split}_x"], f[f"{split}_y"]
        return (x, y, f["train_owner"]) if train else (x, y)


def arrays(n_train=60, n_test=24, dim=6, classes=3, owners=12, seed=0):
    """Small non-IID arrays ``{"train": (x, y, owner), "test": (x, y, owner)}``; owner ids are strings ``"u00"``..."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        owner = rng.integers(0, owners, size=n)
        owner[:owners] = np.arange(owners)  # every owner present
        y = (owner + rng.integers(0, 2, size=n)) % classes
        x = (rng.normal(size=(n, dim)) + y[:, None]).astype(np.float32)
        out[split] = (x, y.astype(np.int64), np.array([f"u{o:02d}" for o in owner]))
    return out


def write(directory, data, datasets_library=True):
    """``data`` (from :func:`arrays`) as ``directory/arrays.npz`` for :func:`load` and as an Arrow data set
    ``directory/hf`` (columns ``x`` a fixed-length list of float32, ``label``, ``owner`` a string); returns both
    paths.  ``datasets_library``: a Hugging Face DatasetDict written by ``save_to_disk`` (``label`` a
    ClassLabel); else, with pyarrow alone (faster to import), the Hugging Face cache's layout: one Arrow IPC
    stream file per split, ``hf/data-train.arrow`` and ``hf/data-test.arrow``."""
    hf = directory / "hf"
    if datasets_library:
        import datasets
        from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

        datasets.disable_progress_bars()
        dim = data["train"][0].shape[1]
        classes = int(max(data["train"][1].max(), data["test"][1].max())) + 1
        features = Features({"x": Sequence(Value("float32"), length=dim),
                             "label": ClassLabel(num_classes=classes), "owner": Value("string")})
        dd = DatasetDict({split: Dataset.from_dict({"x": list(x), "label": y.tolist(), "owner": o.tolist()},
                                                   features=features)
                          for split, (x, y, o) in data.items()})
        dd.save_to_disk(str(hf))
    else:
        import pyarrow as pa

        hf.mkdir(parents=True)
        for split, (x, y, o) in data.items():
            table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
                              "label": pa.array(y), "owner": pa.array(o.tolist())})
            with pa.OSFile(str(hf / f"data-{split}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
                w.write_table(table, max_chunksize=16)  # several record batches
    npz = directory / "arrays.npz"
    np.savez(npz, train_x=data["train"][0], train_y=data["train"][1], train_owner=data["train"][2],
             test_x=data["test"][0], test_y=data["test"][1])
    return hf, npz
