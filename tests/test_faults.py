"""Fault suite: signals, killed ranks, crashes during a checkpoint, damaged
checkpoints, unwritable or full disks, and exact resumption.  The run they
interrupt is trace-driven (the generated device and behaviour traces shipped
in configs/examples/traces, deadline and first_k layers): its virtual clock,
drops and offline devices resume bit for bit too."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from fault_plugin import spec as fault
from helpers import REPO, clean_env, mpiexec_cmd, run_cli, small_config
from qmlhfl_mpi import RunError, Session, load_config
from qmlhfl_mpi.run.preflight import preflight

ROUNDS = 8
TRACES = REPO / "configs" / "examples" / "traces"
SECTIONS = dict(topology={"branching": [2, 2, 2]}, tau=[2, 2, 1], quantizer={"levels": [3, 8, 0], "bucket": 16},
                train={"rounds": ROUNDS},
                system={"device_trace": str(TRACES / "devices.csv"), "availability_trace": str(TRACES / "behaviour.csv"),
                        "availability_period": 2.0, "jitter": "lognormal(0.2)"},
                aggregation={"policy": ["deadline", "first_k", "all"], "deadline": [0.03, 0, 0], "k": [0, 1, 0]})


DETERMINISTIC = ("train_loss", "test_loss", "test_accuracy", "uplink_bytes", "messages", "downlink_bytes",
                 "virtual_time", "dropped", "offline", "link_busy", "critical_path", "finish_time")


def final(path):
    with h5py.File(path, "r") as f:
        return (f["model/final"][()], f["metrics/train_loss"][()], f["metrics/round"][()],
                {k: f["metrics"][k][()] for k in DETERMINISTIC})


@pytest.fixture(scope="module")
def reference(reference_run):
    """The uninterrupted run every restart must reproduce bit for bit (messages dropped, devices offline)."""
    path = reference_run(**SECTIONS)
    got = final(path)
    m = got[3]
    assert (m["dropped"].sum(axis=0)[:2] > 0).all() and m["offline"].sum() > 0
    # exact bytes: every message sent counts, the dropped ones too (docs/system.md, "What counts as sent")
    with h5py.File(path, "r") as f:
        size = f["quantizer/message_bytes"][()]
    assert np.array_equal(m["uplink_bytes"], m["messages"] * size) and (m["messages"] >= m["dropped"]).all()
    return got


def wait_readable(path, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with h5py.File(path, "r"):
                return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def assert_same_as_reference(path, reference):
    model, loss, rounds, metrics = final(path)
    assert np.array_equal(model, reference[0])
    assert np.array_equal(loss, reference[1])
    assert rounds.tolist() == list(range(ROUNDS))
    for k in DETERMINISTIC:  # every round's metrics, those before the interruption included
        assert np.array_equal(metrics[k], reference[3][k], equal_nan=True), k


def test_sigterm_checkpoints_exits_75_and_resumes_exactly_on_other_rank_count(tmp_path, reference):
    cfg = small_config(tmp_path, **SECTIONS)
    # slow the rounds down so the signal lands mid-run
    cmd = [*mpiexec_cmd(2), sys.executable, "-m", "qmlhfl_mpi", "run", str(cfg), "--quiet",
           "--set", fault("delay", seconds=0.25)]
    env = clean_env()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    out = tmp_path / "out.h5"
    deadline = time.monotonic() + 60
    while not (tmp_path / "out.h5.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    assert "--resume" in stderr
    wait_readable(out)
    with h5py.File(out) as f:
        assert f.attrs["status"] == "preempted"
        done = f["metrics/round"].shape[0]
    assert 1 <= done < ROUNDS
    with h5py.File(tmp_path / "out.h5.ckpt") as f:
        assert int(f.attrs["rounds_done"]) == done
    proc2, _ = run_cli(1, ["run", str(cfg), "--quiet", "--resume"], timeout=180)  # another layout: state moves
    assert proc2.returncode == 0, proc2.stderr
    assert_same_as_reference(out, reference)
    assert not (tmp_path / "out.h5.ckpt").exists()


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run whose rank 1 was SIGKILLed after round 3's checkpoint: its directory (config, results, checkpoint).
    Tests copy it.  The job ends within seconds of the kill."""
    tmp = tmp_path_factory.mktemp("killed")
    cfg = small_config(tmp, **SECTIONS)
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet", "--set", fault("kill", rank=1, round=3)], timeout=120)
    assert proc.returncode != 0
    assert secs < 15 + 5
    wait_readable(tmp / "out.h5.ckpt")
    wait_readable(tmp / "out.h5")
    with h5py.File(tmp / "out.h5.ckpt") as f:
        assert int(f.attrs["rounds_done"]) == 3
    return tmp


def copy_of(killed, tmp_path):
    """The killed run's files in ``tmp_path``, its config pointing there."""
    for name in ("out.h5", "out.h5.ckpt"):
        shutil.copy(killed / name, tmp_path / name)
    return small_config(tmp_path, **SECTIONS)


def refused(cfg, *sets):
    """The message and exit code of ``--resume`` of ``cfg`` (with ``--set`` ``sets``), run in this process."""
    with pytest.raises(RunError) as info:
        Session(load_config(str(cfg), list(sets)), MPI.COMM_SELF).run(resume=True)
    return str(info.value), info.value.code


@pytest.mark.portable
def test_sigkilled_rank_ends_job_fast_and_a_truncated_results_file_is_rebuilt(tmp_path, killed, reference):
    cfg = copy_of(killed, tmp_path)
    ck, out = tmp_path / "out.h5.ckpt", tmp_path / "out.h5"
    damaged = out.read_bytes()[: out.stat().st_size // 2]
    out.write_bytes(damaged)  # the results file is cut short, as by a crash of its disk or a full quota
    # without the flag: refused, naming it, nothing changed (the check in process: no extra launch)
    with pytest.raises(RunError, match="--resume --rebuild-results"):
        preflight(load_config(str(cfg)), overwrite=False, resume=True)
    assert out.read_bytes() == damaged
    proc2, _ = run_cli(4, ["run", str(cfg), "--quiet", "--resume", "--rebuild-results"], timeout=180)
    assert proc2.returncode == 0, proc2.stderr
    assert_same_as_reference(out, reference)  # every round, those rebuilt from the checkpoint included
    assert (tmp_path / "out.h5.damaged").read_bytes() == damaged  # kept under a new name
    with h5py.File(out) as f:
        assert f.attrs["rebuilt_rounds"] == 3 and f.attrs["rebuilt_from"] == str(ck)
        assert f.attrs["damaged_file"] == str(tmp_path / "out.h5.damaged")
        assert f.attrs["resumed_at_rounds"].tolist() == [3] and f.attrs["status"] == "completed"


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference):
    cfg = small_config(tmp_path, **SECTIONS)
    proc, _ = run_cli(2, ["run", str(cfg), "--quiet", "--set", fault("ckpt", rank=0, round=4)], timeout=120)
    assert proc.returncode != 0
    ck = tmp_path / "out.h5.ckpt"
    wait_readable(ck)
    with h5py.File(ck) as f:  # round 4's checkpoint died half-written; round 3's is intact
        assert int(f.attrs["rounds_done"]) == 4
    proc2, _ = run_cli(2, ["run", str(cfg), "--quiet", "--resume"], timeout=180)
    assert proc2.returncode == 0, proc2.stderr
    assert_same_as_reference(tmp_path / "out.h5", reference)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_checkpoint_is_refused_and_nothing_is_changed(tmp_path, killed, damage):
    cfg = copy_of(killed, tmp_path)
    ck, out = tmp_path / "out.h5.ckpt", tmp_path / "out.h5"
    if damage == "truncate":
        ck.write_bytes(ck.read_bytes()[:300])
    elif damage == "garbage":
        ck.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2000))
    else:
        ck.unlink()
    before = (out.read_bytes(), ck.read_bytes() if ck.exists() else None)
    text, code = refused(cfg)
    assert code == 2 and "cannot resume" in text and "Nothing was changed" in text, text
    assert (out.read_bytes(), ck.read_bytes() if ck.exists() else None) == before


def test_resume_with_changed_config_lists_the_keys(tmp_path, killed):
    cfg = copy_of(killed, tmp_path)
    text, code = refused(cfg, "train.lr=0.3", "quantizer.levels=[3,8,16]", "train.rounds=12")
    assert code == 2
    assert "train.lr: 0.1 -> 0.3" in text and "quantizer.levels: [3, 8, 0] -> [3, 8, 16]" in text
    assert "train.rounds" not in text  # more rounds is allowed
    # and a fresh run without --resume is refused while the checkpoint exists
    with pytest.raises(RunError, match="--resume") as info:
        Session(load_config(str(cfg)), MPI.COMM_SELF).run()
    assert info.value.code == 2


@pytest.mark.parametrize("where", ["/sys/qmlhfl-test/out.h5", "FILE/out.h5"])
def test_unwritable_output_location(tmp_path, where):
    if where.startswith("FILE"):
        (tmp_path / "FILE").write_text("a file, not a directory")
        where = str(tmp_path / where)
    cfg = small_config(tmp_path, output={"path": where})
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet"], timeout=120)
    assert proc.returncode in (2, 74), proc.stderr
    assert where in proc.stderr and "Traceback" not in proc.stderr
    assert secs < 20


def test_disk_without_room_for_two_checkpoints_is_refused_before_the_first_round(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        # ~65k parameters: 260 kB checkpoints; the run's outputs cannot fit (tests/test_reliability.py fills
        # a disk during a run)
        cfg = small_config(tmp_path, **SECTIONS, model={"name": "mlp", "args": {"hidden": 250}},
                           output={"path": str(mnt / "out.h5")})
        proc, secs = run_cli(2, ["run", str(cfg), "--quiet"], timeout=120)
        assert proc.returncode == 74, proc.stderr
        assert "No space left on device" in proc.stderr and "cannot start the run" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("qmlhfl-mpi: error:") == 1
        assert list(mnt.iterdir()) == []  # nothing was written
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
