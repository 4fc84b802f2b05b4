"""Checkpoint integrity (SHA-256 over what a restart uses) and Ctrl-C (SIGINT) stopping like SIGTERM.

Unit tests of write/read; then real ``mpiexec -n 2`` jobs: a run stopped by
SIGTERM leaves a checkpoint, single flipped bytes in it are refused by
``--resume`` without touching the results file, the intact checkpoint resumes
bit for bit, and SIGINT (at ``mpiexec`` or at every rank, twice) stops the job
with exit 75 and no traceback.
"""
from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from fault_plugin import spec as fault
from helpers import clean_env, mpiexec_cmd, run_cli, small_config
from qmlhfl_mpi.results import CheckpointError, read_checkpoint, write_checkpoint
from qmlhfl_mpi.results.checkpoint import FORMAT, FORMAT_UNVERIFIED, checkpoint_digest

# ---- unit tests of write / read ---------------------------------------------------------------------------------

STATE = {"server.1.0.m": np.arange(5, dtype=np.float32), "b.count": np.array([3, 1], dtype=np.int64),
         "a.flags": np.array([True, False]), "c.scalar": np.array(2.5), "d.big": np.arange(3, dtype=">f8"),
         "e.empty": np.zeros((0, 4), dtype=np.float32)}


def test_roundtrip_without_and_with_state(tmp_path):
    model = np.linspace(-1, 1, 7).astype(np.float32)
    p = tmp_path / "a.ckpt"
    write_checkpoint(p, model=model, rounds_done=3, config_yaml="train:\n  lr: 0.1\n")
    ck = read_checkpoint(p)
    assert np.array_equal(ck.model, model) and ck.rounds_done == 3 and ck.config_yaml == "train:\n  lr: 0.1\n"
    assert ck.state == {}
    with h5py.File(p) as f:
        assert f.attrs["format"] == FORMAT
        assert f.attrs["sha256"] == checkpoint_digest(model, 3, "train:\n  lr: 0.1\n", {})
    write_checkpoint(p, model=model, rounds_done=4, config_yaml="é: 1\n", state=STATE)
    ck = read_checkpoint(p)
    assert ck.rounds_done == 4 and ck.config_yaml == "é: 1\n" and sorted(ck.state) == sorted(STATE)
    for k, v in STATE.items():
        assert ck.state[k].shape == v.shape and np.array_equal(ck.state[k], v), k
    assert not (tmp_path / "a.ckpt.tmp").exists()


def test_digest_covers_every_field_and_state_order_does_not_matter():
    model = np.ones(4, dtype=np.float32)
    base = checkpoint_digest(model, 2, "x: 1\n", STATE)
    assert checkpoint_digest(model, 2, "x: 1\n", dict(reversed(list(STATE.items())))) == base
    changed = [
        checkpoint_digest(model * 2, 2, "x: 1\n", STATE),
        checkpoint_digest(model, 3, "x: 1\n", STATE),
        checkpoint_digest(model, 2, "x: 2\n", STATE),
        checkpoint_digest(model, 2, "x: 1\n", {**STATE, "b.count": np.array([3, 2])}),
        checkpoint_digest(model, 2, "x: 1\n", {**STATE, "b.count": np.array([3, 1], dtype=np.int32)}),
        checkpoint_digest(model, 2, "x: 1\n", {**STATE, "e.empty": np.zeros((4, 0), dtype=np.float32)}),
        checkpoint_digest(model, 2, "x: 1\n", {("z" if k == "a.flags" else k): v for k, v in STATE.items()}),
        checkpoint_digest(model, 2, "x: 1\n", STATE, fmt=FORMAT_UNVERIFIED),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    # a big-endian array hashes as its values, not its byte order
    assert checkpoint_digest(model, 2, "", {"v": np.arange(3, dtype=">f8")}) == \
        checkpoint_digest(model, 2, "", {"v": np.arange(3, dtype="<f8")})


def test_tampered_attributes_and_missing_digest_are_refused(tmp_path):
    p = tmp_path / "a.ckpt"
    model = np.arange(6, dtype=np.float32)

    def fresh():
        write_checkpoint(p, model=model, rounds_done=3, config_yaml="train:\n  lr: 0.1\n", state=STATE)

    for attr, value in [("rounds_done", 2), ("config_yaml", "train:\n  lr: 0.2\n"), ("format", FORMAT_UNVERIFIED),
                        ("sha256", "0" * 64)]:
        fresh()
        with h5py.File(p, "r+") as f:
            expected = str(f.attrs["sha256"])
            f.attrs[attr] = value
        with pytest.raises(CheckpointError, match="is damaged: its content does not match its SHA-256") as e:
            read_checkpoint(p)
        msg = str(e.value)
        assert str(p) in msg and "--overwrite" in msg and "restore the file" in msg
        assert f"expected {(value if attr == 'sha256' else expected)[:16]}..." in msg
    fresh()
    with h5py.File(p, "r+") as f:
        f["state/b.count"][0] = 4
    with pytest.raises(CheckpointError, match="is damaged"):
        read_checkpoint(p)
    fresh()
    with h5py.File(p, "r+") as f:
        del f.attrs["sha256"]
    with pytest.raises(CheckpointError, match=f"{p}.*is damaged: its format .* needs a sha256 attribute.*--overwrite"):
        read_checkpoint(p)
    fresh()
    with h5py.File(p, "r+") as f:
        f.attrs["format"] = "something else"
    with pytest.raises(CheckpointError, match="not a qmlhfl_mpi checkpoint"):
        read_checkpoint(p)


def test_old_format_without_digest_is_read_with_a_warning(tmp_path, caplog):
    p = tmp_path / "old.ckpt"
    model = np.arange(4, dtype=np.float32)
    with h5py.File(p, "w") as f:  # exactly what the previous version wrote
        f.attrs["rounds_done"] = 2
        f.attrs["config_yaml"] = "train:\n  rounds: 4\n"
        f.attrs["format"] = FORMAT_UNVERIFIED
        f.create_dataset("model", data=model)
        f.create_group("state").create_dataset("s", data=np.ones(3))
    with caplog.at_level(logging.WARNING, logger="qmlhfl_mpi.results.checkpoint"):
        ck = read_checkpoint(p)
    assert ck.rounds_done == 2 and np.array_equal(ck.model, model) and np.array_equal(ck.state["s"], np.ones(3))
    assert any("without a SHA-256 digest" in r.getMessage() and str(p) in r.getMessage() for r in caplog.records)


# ---- real jobs ------------------------------------------------------------------------------------------------

ROUNDS = 8
# server optimisers with state, so the checkpoint carries /state entries
SECTIONS = dict(topology={"branching": [2, 2, 2]}, tau=[2, 2, 1], quantizer={"levels": [3, 8, 0], "bucket": 16},
                train={"rounds": ROUNDS}, server={"optimizer": ["adam", "momentum", "avg"]})


def final(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["model/final"][()], f["metrics/train_loss"][()], f["metrics/round"][()]


def assert_same_as_reference(path: Path, reference) -> None:
    model, loss, rounds = final(path)
    assert np.array_equal(model, reference[0]) and np.array_equal(loss, reference[1])
    assert rounds.tolist() == list(range(ROUNDS))


@pytest.fixture(scope="module")
def reference(reference_run):
    """The uninterrupted run every restart must reproduce bit for bit."""
    return final(reference_run(**SECTIONS))


def stop_mid_run(cfg: Path, sig: int, target: str, times: int = 1) -> subprocess.CompletedProcess:
    """Start ``mpiexec -n 2`` slowed down, wait for the first checkpoint, send ``sig`` ``times`` times to
    ``target`` (``"mpiexec"`` or ``"ranks"``) and wait for the job to end."""
    cmd = [*mpiexec_cmd(2), sys.executable, "-m", "qmlhfl_mpi", "run", str(cfg), "--quiet",
           "--set", fault("delay", seconds=0.3)]
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        ck = Path(f"{cfg.parent / 'out.h5'}.ckpt")
        deadline = time.monotonic() + 60
        while not ck.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if not ck.exists():
            proc.kill()
            raise AssertionError(f"the job wrote no checkpoint (exit {proc.wait()}): {proc.communicate()[1]}")
        if target == "mpiexec":
            pids = [proc.pid]
        else:  # the rank processes: their command lines name the (unique) config; mpiexec's does too
            found = subprocess.run(["pgrep", "-f", f"qmlhfl_mpi run {cfg}"], capture_output=True, text=True)
            pids = [int(x) for x in found.stdout.split() if int(x) != proc.pid]
            assert len(pids) == 2, found
        for _ in range(times):
            for pid in pids:
                os.kill(pid, sig)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped by SIGTERM: its directory, config and the pristine results and checkpoint."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = small_config(tmp, **SECTIONS)
    proc = stop_mid_run(cfg, signal.SIGTERM, "mpiexec")
    assert proc.returncode == 75, proc.stderr
    out, ck = tmp / "out.h5", tmp / "out.h5.ckpt"
    with h5py.File(ck) as f:
        assert f.attrs["format"] == FORMAT and len(f["state"]) > 0
        assert 1 <= int(f.attrs["rounds_done"]) < ROUNDS
    return cfg, out, ck, out.read_bytes(), ck.read_bytes()


def restore(stopped) -> tuple[Path, Path, Path]:
    cfg, out, ck, out_bytes, ck_bytes = stopped
    out.write_bytes(out_bytes)
    ck.write_bytes(ck_bytes)
    return cfg, out, ck


def flip_byte(path: Path, offsets: list[int], took_effect: Callable[[h5py.File], bool]) -> int:
    """Flip the lowest bit of the first byte in ``offsets`` after which the file still opens and
    ``took_effect(file)`` holds (the damage reads back silently, as bit rot would); that offset."""
    data = bytearray(path.read_bytes())
    for off in offsets:
        data[off] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            with h5py.File(path, "r") as f:
                if took_effect(f):
                    return off
        except Exception:  # noqa: BLE001 - a structural byte: try the next one
            pass
        data[off] ^= 0x01
    path.write_bytes(bytes(data))
    raise AssertionError(f"no offset among {offsets[:8]}... damaged {path} as intended")


def damage(ck: Path, where: str) -> None:
    with h5py.File(ck, "r") as f:
        model, rounds, cfg_yaml = f["model"][()], int(f.attrs["rounds_done"]), str(f.attrs["config_yaml"])
        name = sorted(f["state"])[0]
        entry = f["state"][name][()]
        model_at, entry_at = f["model"].id.get_offset(), f["state"][name].id.get_offset()
    raw = ck.read_bytes()
    if where == "model":  # a mantissa byte of the 3rd value
        flip_byte(ck, [model_at + 8 + 1], lambda f: not np.array_equal(f["model"][()], model))
    elif where == "state":
        flip_byte(ck, [entry_at + 4 + 1], lambda f: not np.array_equal(f["state"][name][()], entry))
    elif where == "rounds_done":  # the int64 value somewhere after the attribute's name
        start = raw.index(b"rounds_done")
        value = struct.pack("<q", rounds)
        offsets = [i for i in range(start, start + 200) if raw[i:i + 8] == value]
        flip_byte(ck, offsets, lambda f: int(f.attrs["rounds_done"]) == rounds ^ 1)
    else:  # config_yaml: 'rounds: 8' -> 'rounds: 9', a key --resume may change, so only the digest notices
        assert cfg_yaml.count(f"rounds: {ROUNDS}\n") == 1
        at = raw.index(f"  rounds: {ROUNDS}\n".encode()) + len("  rounds: ")
        flip_byte(ck, [at], lambda f: f"  rounds: {ROUNDS + 1}\n" in str(f.attrs["config_yaml"]))


@pytest.mark.parametrize("where", ["model", "state", "rounds_done", "config_yaml"])
def test_flipped_byte_is_refused_and_nothing_is_changed(stopped, where):
    """A real 2-rank job for the model's byte; the same refusal in this process for the others (the digest check
    is rank 0's, agreed on by every rank before anything is read)."""
    cfg, out, ck = restore(stopped)
    damage(ck, where)
    before = snapshot(out), snapshot(ck)
    if where == "model":
        proc, secs = run_cli(2, ["run", str(cfg), "--quiet", "--resume"], timeout=120)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr
    else:
        from mpi4py import MPI

        from qmlhfl_mpi import load_config
        from qmlhfl_mpi.run.errors import RunError
        from qmlhfl_mpi.run.session import Session
        with pytest.raises(RunError) as info:
            Session(load_config(str(cfg)), MPI.COMM_SELF).run(resume=True)
        assert info.value.code == 2
        err = str(info.value)
    assert f"cannot resume {str(out)!r}" in err and str(ck) in err and "is damaged" in err, err
    assert "SHA-256" in err and "expected " in err and "found " in err and "Nothing was changed" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert (snapshot(out), snapshot(ck)) == before


def test_intact_checkpoint_resumes_bit_identical(stopped, reference):
    cfg, out, ck = restore(stopped)
    proc, _ = run_cli(2, ["run", str(cfg), "--quiet", "--resume"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "unverified" not in proc.stderr and "without a SHA-256" not in proc.stderr
    assert_same_as_reference(out, reference)
    assert not ck.exists()


@pytest.mark.parametrize("target,times", [("mpiexec", 1), ("ranks", 2)])
def test_sigint_stops_like_sigterm(tmp_path, reference, target, times):
    """Ctrl-C at mpiexec (hydra forwards one SIGINT to every rank), or SIGINT twice at every rank."""
    cfg = small_config(tmp_path, **SECTIONS)
    proc = stop_mid_run(cfg, signal.SIGINT, target, times)
    assert proc.returncode == 75, proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert "SIGINT received" in proc.stderr and "--resume" in proc.stderr
    if times > 1:
        assert proc.stderr.count("received while already stopping: ignored") == 1, proc.stderr
    out, ck = tmp_path / "out.h5", tmp_path / "out.h5.ckpt"
    with h5py.File(out) as f:
        assert f.attrs["status"] == "preempted"
        done = f["metrics/round"].shape[0]
    assert 1 <= done < ROUNDS and read_checkpoint(ck).rounds_done == done
    if target == "ranks":  # the same checkpoint as after Ctrl-C at mpiexec: resuming it once is enough
        return
    proc2, _ = run_cli(2, ["run", str(cfg), "--quiet", "--resume"], timeout=120)
    assert proc2.returncode == 0, proc2.stderr
    assert_same_as_reference(out, reference)
