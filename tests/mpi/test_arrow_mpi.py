"""The ``arrow`` data set on ``COMM_WORLD`` under pytest-mpi: a run on memory-mapped Arrow stream files (the
Hugging Face cache's layout, one file per split) with the natural split over the owner column ends bit-identical
to the same arrays given through a plug-in.

Run by tests/test_pytest_mpi.py as ``mpiexec -n K python -m pytest --with-mpi tests/mpi`` (K = 2 and 4; the tree
has 6 devices and the data 12 owners).  The in-process checks: tests/test_arrow.py.
"""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from helpers import REPO, SMALL
from qmlhfl_mpi import Session, load_config

pytest.importorskip("pyarrow")

KEYS = ("model/final", "metrics/train_loss", "metrics/test_loss", "metrics/test_accuracy", "topology/samples")


@pytest.mark.mpi
def test_arrow_and_the_same_arrays_from_a_plugin_train_the_same_model(mpi_tmp_path):
    from arrow_plugin import arrays, write

    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        write(mpi_tmp_path, arrays(), datasets_library=False)  # the HF cache's layout, pyarrow only
    comm.Barrier()
    sections = {
        "arrow": {"name": "arrow", "root": str(mpi_tmp_path),
                  "args": {"path": "hf", "features": "x", "label": "label", "owner": "owner"}},
        "plugin": {"name": f"{REPO / 'tests' / 'arrow_plugin.py'}:load",
                   "args": {"path": str(mpi_tmp_path / "arrays.npz")}},
    }
    got = {}
    for name, data in sections.items():
        raw = copy.deepcopy(SMALL)
        raw["data"] = {**data, "partition": {"kind": "natural"}}
        raw["output"] = {"path": str(mpi_tmp_path / f"{name}.h5")}
        assert Session(load_config(raw), comm).run().status == "completed"
        comm.Barrier()
        with h5py.File(raw["output"]["path"], "r") as f:
            got[name] = {k: f[k][()] for k in KEYS}
    for key in KEYS:
        assert np.array_equal(got["arrow"][key], got["plugin"][key], equal_nan=True), key
    assert got["arrow"]["topology/samples"].sum() == 60
