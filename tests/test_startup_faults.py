"""An unexpected error at any stage of a run's start (and in its first rounds) leaves no junk: no lock, no
space reserve, no unreadable or empty results file; a file that holds rounds records ``status = failed``
with the message.  In process on ``COMM_SELF``; tests/mpi/test_startup_mpi.py does the same on 2-4 ranks
with the failure on one rank only."""
from __future__ import annotations

import copy

import h5py
import pytest

from helpers import SMALL
from qmlhfl_mpi import Callback, RunError, Session, load_config
from qmlhfl_mpi.config import build as builders
from qmlhfl_mpi.config.schema import Config
from qmlhfl_mpi.results import writer as writer_module
from qmlhfl_mpi.results.checkpoint import checkpoint_path
from qmlhfl_mpi.run import lock as lock_module
from qmlhfl_mpi.run import preflight as preflight_module
from qmlhfl_mpi.run import recorder as recorder_module
from qmlhfl_mpi.run import runtime as runtime_module

pytestmark = pytest.mark.portable
INJECTED = "injected start-up fault"


class Boom(Exception):
    pass


def boom(*_args, **_kwargs):
    raise Boom(INJECTED)


class RaiseAtStart(Callback):
    def on_run_start(self, session):
        raise Boom(INJECTED)


class RaiseInRound(Callback):
    """Makes the round's executor raise in round ``k`` (so rounds 0..k-1 are in the file)."""

    def __init__(self, k):
        self.k = k

    def on_run_start(self, session):
        executor, real = session.executor, session.executor.run

        def run(plan, w):
            if plan.round == self.k:
                raise Boom(INJECTED)
            return real(plan, w)

        executor.run = run


# (stage, object, attribute): each raises when the run reaches it
STAGES = [
    ("memory check", runtime_module, "check_memory"),
    ("tree", Config, "build_tree"),
    ("data", builders, "local_data"),
    ("model", builders, "model"),
    ("codecs", builders, "codecs"),
    ("links", builders, "links"),
    ("trainer", runtime_module, "LocalTrainer"),
    ("planner", runtime_module, "Planner"),
    ("executor", runtime_module, "RoundExecutor"),
    ("lock", lock_module.OutputLock, "acquire"),
    ("preflight", preflight_module, "preflight"),
    ("disk space", preflight_module, "require_space"),
    ("config callbacks", Session, "config_callbacks"),
    ("class counts", runtime_module.Runtime, "new_class_counts"),
    ("space reserve", recorder_module.Reserve, "take"),
    ("results attributes", writer_module, "_set_attrs"),  # the HDF5 file exists, half written
    ("results datasets", writer_module, "_clean_array"),
]


def config(tmp_path, rounds=3, **train):
    raw = copy.deepcopy(SMALL)
    raw["train"].update(rounds=rounds, **train)
    raw["output"] = {"path": str(tmp_path / "run.h5")}
    return load_config(raw)


def self_comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


def assert_no_junk(tmp_path, rounds_kept=0):
    """Only a readable results file with ``rounds_kept`` rounds and status failed (or nothing) is left."""
    out = tmp_path / "run.h5"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "run.h5.lock" not in left and "run.h5.reserve" not in left, left
    if rounds_kept == 0:
        assert "run.h5" not in left, "a results file without a round was left behind"
        return
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "failed"
        assert INJECTED in f.attrs["status_message"]
        assert f["metrics/round"][()].tolist() == list(range(rounds_kept))


@pytest.mark.parametrize("stage,owner,attr", STAGES, ids=[s[0] for s in STAGES])
def test_an_unexpected_error_at_a_start_up_stage_leaves_no_junk(tmp_path, monkeypatch, stage, owner, attr):
    monkeypatch.setattr(owner, attr, boom)
    with pytest.raises(RunError) as info:
        Session(config(tmp_path), self_comm()).run()
    assert info.value.code == 1, info.value  # unexpected: exit 1, one message naming the stage and the error
    assert INJECTED in str(info.value) and "unexpected error on rank 0 while" in str(info.value)
    assert_no_junk(tmp_path)


def test_a_callback_failing_at_run_start_leaves_no_file(tmp_path):
    with pytest.raises(RunError, match=INJECTED):
        Session(config(tmp_path), self_comm()).run([RaiseAtStart()])
    assert_no_junk(tmp_path)


@pytest.mark.parametrize("k", [0, 2])
def test_an_error_in_a_round_records_failed_or_removes_an_empty_file(tmp_path, k):
    with pytest.raises(Boom):
        Session(config(tmp_path, rounds=4), self_comm()).run([RaiseInRound(k)])
    assert_no_junk(tmp_path, rounds_kept=k)


def test_a_failed_resume_keeps_the_file_and_records_the_failure(tmp_path):
    cfg = config(tmp_path, rounds=4)

    class StopAfter1(Callback):
        def on_round_end(self, session, record):
            return record["round"] == 1

    assert Session(cfg, self_comm()).run([StopAfter1()]).status == "preempted"
    with pytest.raises(Boom):
        Session(cfg, self_comm()).run([RaiseInRound(3)], resume=True)
    assert_no_junk(tmp_path, rounds_kept=3)
    assert checkpoint_path(tmp_path / "run.h5").exists()  # the last checkpoint (3 rounds) is kept for --resume


def test_an_unexpected_checkpoint_failure_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_module, "write_checkpoint", boom)
    with pytest.raises(RunError) as info:
        Session(config(tmp_path), self_comm()).run()
    assert info.value.code == 1 and "while writing the checkpoint" in str(info.value)
    assert_no_junk(tmp_path, rounds_kept=1)
