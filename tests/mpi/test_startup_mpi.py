"""An unexpected error on ONE rank at a start-up stage ends every rank with the same ``RunError`` (exit 1),
and rank 0 leaves no lock, no space reserve and no results file without a round.  Under pytest-mpi on
K >= 1 ranks (tests/test_pytest_mpi.py); the failing rank is the last one.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from mpi4py import MPI

from helpers import SMALL
from qmlhfl_mpi import RunError, Session, load_config
from qmlhfl_mpi.config import build as builders
from qmlhfl_mpi.results import writer as writer_module
from qmlhfl_mpi.run import runtime as runtime_module

# (stage, owner, attribute, which rank fails: "last" or 0)
STAGES = [
    ("data", builders, "local_data", "last"),
    ("model", builders, "model", "last"),
    ("trainer", runtime_module, "LocalTrainer", "last"),
    ("config callbacks", Session, "config_callbacks", "last"),
    ("results attributes", writer_module, "_set_attrs", 0),  # only rank 0 writes; the file exists half-written
]


class Boom(Exception):
    pass


@pytest.mark.mpi
@pytest.mark.parametrize("stage,owner,attr,who", STAGES, ids=[s[0] for s in STAGES])
def test_one_rank_failing_at_start_up_stops_all_and_leaves_no_junk(mpi_tmp_path, monkeypatch, stage, owner, attr,
                                                                   who):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    failing = size - 1 if who == "last" else 0
    if rank == failing:
        real = getattr(owner, attr)

        def boom(*args, **kwargs):
            raise Boom(f"injected on rank {rank}")

        monkeypatch.setattr(owner, attr, boom)
        assert real is not boom
    raw = copy.deepcopy(SMALL)
    out = Path(mpi_tmp_path) / f"{stage.replace(' ', '_')}.h5"
    raw["output"] = {"path": str(out)}
    with pytest.raises(RunError) as info:
        Session(load_config(raw), comm).run()
    assert info.value.code == 1
    assert f"unexpected error on rank {failing} while" in str(info.value)
    assert f"injected on rank {failing}" in str(info.value)
    texts = comm.allgather(str(info.value))
    assert len(set(texts)) == 1  # one message, the same on every rank
    comm.Barrier()
    if rank == 0:
        left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))
        assert left == [], left
