"""The Python API in-process under pytest-mpi: ``Session`` on ``COMM_WORLD`` and on a
duplicated communicator, custom callbacks, a callback-requested stop and exact resume.

Run by tests/test_pytest_mpi.py as ``mpiexec -n K python -m pytest --with-mpi tests/mpi``;
every test passes at any K >= 1 (the tree has 6 devices; K <= 6).
"""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
from mpi4py import MPI

import qmlhfl_mpi
from qmlhfl_mpi import Callback, RunError, Session, load_config

RAW = {
    "topology": {"branching": [2, 3]},
    "tau": [2, 2],
    "quantizer": {"levels": [3, 8], "bucket": 16},
    "train": {"lr": 0.1, "batch_size": 8, "rounds": 5, "seed": 7},
    "data": {"name": "synthetic", "synthetic": {"dim": 6, "classes": 3, "samples": 24}},
    "model": {"name": "mlp", "args": {"hidden": 5}},
}


def config(path, **train):
    raw = copy.deepcopy(RAW)
    raw["train"].update(train)
    raw["output"] = {"path": str(path)}
    return load_config(raw)


class CountRounds(Callback):
    def __init__(self):
        self.starts, self.rounds, self.ends, self.summary = 0, [], 0, None

    def on_run_start(self, session):
        self.starts += 1
        assert session.size == session.comm.Get_size()

    def on_round_end(self, session, record):
        self.rounds.append(int(record["round"]))
        assert record["uplink_bytes"].shape == (session.tree.N,)
        assert np.array_equal(session.model_vector, session.model_vector)  # the cloud model after the round

    def on_run_end(self, session, summary):
        self.ends += 1
        self.summary = summary


class StopAfter(Callback):
    """Asks to stop after round ``k`` -- on one rank only: the stop must still be agreed by all."""

    def __init__(self, k, rank=None):
        self.k, self.rank = k, rank

    def on_round_end(self, session, record):
        return int(record["round"]) == self.k and (self.rank is None or session.rank == self.rank)


def final(path):
    with h5py.File(path, "r") as f:
        return f["model/final"][()], f["metrics/train_loss"][()], f.attrs["status"]


@pytest.mark.two_ranks
@pytest.mark.mpi
@pytest.mark.parametrize("which", ["world", "dup"])
def test_session_runs_in_process_with_a_counting_callback(mpi_tmp_path, which):
    comm = MPI.COMM_WORLD if which == "world" else MPI.COMM_WORLD.Dup()
    out = mpi_tmp_path / f"{which}.h5"
    counter = CountRounds()
    summary = Session(config(out), comm).run([counter])
    assert summary.status == "completed" and summary.rounds_done == 5 and summary.path == str(out)
    assert counter.starts == 1 and counter.ends == 1 and counter.rounds == [0, 1, 2, 3, 4]
    assert counter.summary == summary and 0 <= summary.final_accuracy <= 1
    comm.Barrier()
    model, loss, status = final(out)
    assert status == "completed" and loss.shape == (5,) and np.isfinite(model).all()
    if which == "dup":
        comm.Free()


@pytest.mark.two_ranks
@pytest.mark.mpi
def test_same_model_on_world_and_on_a_duplicate_and_on_self(mpi_tmp_path):
    """The communicator does not change the result: COMM_WORLD, a Dup of it, and COMM_SELF (rank 0 alone)."""
    world = mpi_tmp_path / "w.h5"
    Session(config(world), MPI.COMM_WORLD).run()
    dup = MPI.COMM_WORLD.Dup()
    Session(config(mpi_tmp_path / "d.h5"), dup).run()
    dup.Free()
    if MPI.COMM_WORLD.rank == 0:
        Session(config(mpi_tmp_path / "s.h5"), MPI.COMM_SELF).run()
    MPI.COMM_WORLD.Barrier()
    ref = final(world)[0]
    assert np.array_equal(ref, final(mpi_tmp_path / "d.h5")[0])
    assert np.array_equal(ref, final(mpi_tmp_path / "s.h5")[0])


@pytest.mark.two_ranks
@pytest.mark.mpi
@pytest.mark.parametrize("stopper_rank", [None, "last"])
def test_callback_stop_is_agreed_checkpointed_and_resumes_bit_identically(mpi_tmp_path, stopper_rank):
    comm = MPI.COMM_WORLD
    ref, out = mpi_tmp_path / f"ref-{stopper_rank}.h5", mpi_tmp_path / f"stop-{stopper_rank}.h5"
    Session(config(ref), comm).run()
    rank = comm.size - 1 if stopper_rank == "last" else None
    summary = Session(config(out), comm).run([StopAfter(1, rank)])
    assert summary.status == "preempted" and summary.rounds_done == 2 and "--resume" in summary.message
    comm.Barrier()
    with h5py.File(f"{out}.ckpt", "r") as f:
        assert int(f.attrs["rounds_done"]) == 2
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "preempted" and f["metrics/round"].shape == (2,)
    comm.Barrier()
    counter = CountRounds()
    resumed = Session(config(out), comm).run([counter], resume=True)
    assert resumed.status == "completed" and resumed.rounds_done == 5 and counter.rounds == [2, 3, 4]
    comm.Barrier()
    a, b = final(ref), final(out)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and b[2] == "completed"


class Exploding(Callback):
    def on_round_end(self, session, record):
        if session.rank == session.size - 1 and record["round"] == 1:
            raise KeyError("boom")


@pytest.mark.mpi
def test_a_failing_callback_on_one_rank_stops_every_rank_with_one_error(mpi_tmp_path):
    out = mpi_tmp_path / "boom.h5"
    with pytest.raises(RunError) as err:
        Session(config(out), MPI.COMM_WORLD).run([Exploding()])
    assert "Exploding.on_round_end failed on rank" in str(err.value) and "KeyError" in str(err.value)
    assert err.value.code == 1
    MPI.COMM_WORLD.Barrier()
    with h5py.File(out, "r") as f:  # the rounds done are kept and the file says what happened
        assert f.attrs["status"] == "failed" and f["metrics/round"].shape == (2,)


@pytest.mark.mpi
def test_bad_input_raises_the_same_run_error_on_every_rank(mpi_tmp_path):
    raw = copy.deepcopy(RAW)
    raw["model"] = {"name": str(mpi_tmp_path / "missing.py") + ":build"}
    raw["output"] = {"path": str(mpi_tmp_path / "x.h5")}
    with pytest.raises(RunError) as err:
        Session(load_config(raw), MPI.COMM_WORLD)
    assert "missing.py" in str(err.value) and "no such file" in str(err.value) and err.value.code == 2
    msgs = MPI.COMM_WORLD.allgather(str(err.value))
    assert len(set(msgs)) == 1


@pytest.mark.two_ranks
@pytest.mark.mpi
def test_public_names():
    for name in ("load_config", "Session", "Callback", "RunSummary", "RunError", "MODELS", "DATASETS",
                 "PARTITIONERS", "CODECS", "Codec", "ConsoleTable", "CSVLog", "TensorBoardLog", "SignalStop"):
        assert hasattr(qmlhfl_mpi, name), name
    assert "collective" in Session.run.__doc__.lower() and "collective" in Session.__doc__.lower()
