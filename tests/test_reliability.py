"""Nothing lost, nobody in: full disks (a real tmpfs that fills up), one writer per output
(the lock file), all under real ``mpiexec``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from fault_plugin import spec as fault
from helpers import clean_env, mpiexec_cmd, run_cli, small_config
from qmlhfl_mpi.run.errors import RunError
from qmlhfl_mpi.run.lock import OutputLock

SECTIONS = dict(train={"rounds": 8, "vectorize": "off"}, output={"path": "out.h5", "checkpoint_every": 1})


@pytest.fixture
def tmpfs(tmp_path):
    """A 3 MB tmpfs (root only; skipped with the reason where mounting is not permitted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def final(path):
    with h5py.File(path) as f:
        return f["model/final"][()]


@pytest.fixture(scope="module")
def uninterrupted(reference_run):
    return final(reference_run(**SECTIONS))


@pytest.mark.parametrize("leave,when", [(60_000, "checkpoint"), (110_000, "append")])
def test_disk_full_during_the_run_exits_74_keeps_everything_and_resumes_exactly(tmp_path, tmpfs, uninterrupted,
                                                                                 leave, when):
    cfg = small_config(tmp_path, **{**SECTIONS, "output": {**SECTIONS["output"], "path": str(tmpfs / "out.h5")}})
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet", "--set",
                             fault("fill", rank=0, round=3, path=str(tmpfs), leave=leave)], timeout=120)
    assert proc.returncode == 74, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("qmlhfl-mpi: error:") == 1, proc.stderr
    assert "No space left on device" in proc.stderr and str(tmpfs) in proc.stderr and "--resume" in proc.stderr
    assert ("the checkpoint" if when == "checkpoint" else "appending round 4") in proc.stderr, proc.stderr
    out = tmpfs / "out.h5"
    with h5py.File(out) as f:  # every round written so far is readable, and the status says what happened
        rounds = f["metrics/round"][()].tolist()
        assert f.attrs["status"] == "failed" and "No space left" in f.attrs["status_message"]
    assert rounds == [0, 1, 2, 3]
    with h5py.File(str(out) + ".ckpt") as f:  # the last complete checkpoint (before round 3's, which had no room)
        assert int(f.attrs["rounds_done"]) == (3 if when == "checkpoint" else 4)
    assert not (tmpfs / "out.h5.lock").exists() and not (tmpfs / "out.h5.reserve").exists()
    (tmpfs / "filler").unlink()
    proc2, _ = run_cli(3, ["run", str(cfg), "--quiet", "--resume"], timeout=120)
    assert proc2.returncode == 0, proc2.stderr
    assert np.array_equal(final(out), uninterrupted)


def test_a_disk_too_small_is_refused_before_the_first_round(tmp_path, tmpfs):
    from fault_plugin import fill
    fill(tmpfs, 100_000)
    cfg = small_config(tmp_path, **{**SECTIONS, "output": {**SECTIONS["output"], "path": str(tmpfs / "out.h5")}})
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet"], timeout=60)
    assert proc.returncode == 74, proc.stderr
    assert "cannot start the run" in proc.stderr and "Free disk space" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]  # nothing was written


def test_two_runs_on_one_output_one_completes_the_other_is_refused_naming_the_holder(tmp_path):
    cfg = small_config(tmp_path, train={"rounds": 12}, output={"path": "out.h5"})
    first = subprocess.Popen([*mpiexec_cmd(2), sys.executable, "-m", "qmlhfl_mpi", "run", str(cfg),
                              "--quiet", "--set", fault("delay", seconds=0.25)], env=clean_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    lock = tmp_path / "out.h5.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    holder = json.loads(lock.read_text())
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet", "--overwrite"], timeout=60)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert proc.returncode == 2, proc.stderr
    assert f"pid {holder['pid']}" in proc.stderr and "another run is writing it" in proc.stderr, proc.stderr
    assert proc.stderr.count("qmlhfl-mpi: error:") == 1
    with h5py.File(tmp_path / "out.h5") as f:  # the first run's file is intact
        assert f.attrs["status"] == "completed" and f["metrics/round"].shape[0] == 12
    assert not lock.exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path: Path, **fields) -> None:
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "started": "then", "job": "",
                                **fields}))


def test_stale_lock_is_explained_and_taken_over_only_by_resume_or_overwrite(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = tmp_path / "out.h5"
    lock = OutputLock(out)
    dead = _dead_pid()
    _write_lock(lock.path, pid=dead)
    with pytest.raises(RunError, match=rf"no longer running \(pid {dead} .*--resume.*--overwrite.*delete the lock"):
        lock.acquire(take_over_stale=False)
    assert json.loads(lock.path.read_text())["pid"] == dead  # not stolen
    lock.acquire(take_over_stale=True)
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_live_or_foreign_locks_are_never_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = OutputLock(tmp_path / "out.h5")
    _write_lock(lock.path, pid=os.getppid())
    with pytest.raises(RunError, match=rf"another run is writing it \(pid {os.getppid()} "):
        lock.acquire(take_over_stale=True)
    _write_lock(lock.path, host=f"elsewhere-{uuid.uuid4().hex[:6]}", pid=1)
    with pytest.raises(RunError, match="another machine holds it .*cannot be checked"):
        lock.acquire(take_over_stale=True)
    lock.path.write_text("{not json")
    with pytest.raises(RunError, match="unreadable"):
        lock.acquire(take_over_stale=True)
    # the same SLURM job (a requeued job restarts on another node) takes its own lock over
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(lock.path, host="node-that-failed", pid=1, job="4242")
    lock.acquire(take_over_stale=True)
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_stopped_rank_ends_the_job_within_the_round_timeout_naming_it_and_resume_is_exact(tmp_path,
                                                                                               uninterrupted):
    cfg = small_config(tmp_path, **SECTIONS)
    proc, secs = run_cli(3, ["run", str(cfg), "--quiet", "--set", "train.round_timeout=3", "--set",
                             fault("stop", rank=1, round=4, path=str(tmp_path))], timeout=120)
    ended = time.time()
    assert proc.returncode == 76, proc.stderr
    stopped = float((tmp_path / "stopped_at").read_text())
    assert ended - stopped < 3 + 10, (ended - stopped, proc.stderr)  # the timeout, the 2 s grace, the abort
    assert "rank 1 did not respond" in proc.stderr and "round 4" in proc.stderr, proc.stderr
    assert proc.stderr.count("train.round_timeout = 3 s") == 1 and "Traceback" not in proc.stderr, proc.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        assert f.attrs["status"] == "failed" and "rank 1 did not respond" in f.attrs["status_message"]
        assert f["metrics/round"][()].tolist() == [0, 1, 2, 3]
    with h5py.File(tmp_path / "out.h5.ckpt") as f:  # plain averaging: the model is the whole state
        assert int(f.attrs["rounds_done"]) == 4
    left = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True)
    assert left.returncode == 1, left.stdout  # none left
    proc2, _ = run_cli(2, ["run", str(cfg), "--quiet", "--resume"], timeout=120)
    assert proc2.returncode == 0, proc2.stderr
    assert np.array_equal(final(tmp_path / "out.h5"), uninterrupted)


def test_resume_refuses_a_cosine_schedule_with_other_rounds_and_keeps_everything(tmp_path):
    import copy

    from mpi4py import MPI

    from helpers import SMALL
    from qmlhfl_mpi import Callback, Session, load_config

    class StopAfter(Callback):
        def on_round_end(self, session, record):
            return record["round"] == 1

    raw = copy.deepcopy(SMALL)
    raw["train"].update(rounds=5, lr_schedule="cosine")
    raw["output"] = {"path": str(tmp_path / "out.h5")}
    assert Session(load_config(raw), MPI.COMM_SELF).run([StopAfter()]).status == "preempted"
    before = (tmp_path / "out.h5").read_bytes()
    with pytest.raises(RunError, match=r"cosine learning-rate schedule spans the run's train.rounds=5.*"
                                       r"--set train.rounds=5") as err:
        Session(load_config(raw, ["train.rounds=8"]), MPI.COMM_SELF).run(resume=True)
    assert err.value.code == 2
    assert (tmp_path / "out.h5").read_bytes() == before and (tmp_path / "out.h5.ckpt").exists()
    assert Session(load_config(raw), MPI.COMM_SELF).run(resume=True).status == "completed"
