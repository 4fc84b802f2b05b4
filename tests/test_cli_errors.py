"""Bad input and failures under ``mpiexec -n 2``: a clear message, a non-zero
exit within seconds, no hang, nothing overwritten."""
from __future__ import annotations

import time

import h5py
import pytest

from fault_plugin import spec as fault
from helpers import run_cli, small_config

FAST = 20  # seconds: start-up of two Python ranks plus the check, with margin on a loaded machine


@pytest.mark.parametrize("sections,message", [
    ({"train": {"lr": 0.1, "learnig_rate": 1}}, "unknown config key(s) 'train.learnig_rate'"),
    ({"tau": [2]}, "'tau' = [2]: the tree has N=2 layers, so give 2 values"),
    ({"quantizer": {"levels": [4, -2]}}, "'quantizer.levels[1]' = -2: expected an integer from 0 to 32767"),
    ({"topology": {"tree": 1}, "tau": [1], "quantizer": {"levels": [4]}},
     "2 MPI ranks cannot host a tree of 1 devices"),
    ({"data": {"name": "fashion-mnist", "root": "/nonexistent/fmnist"}, "model": {"name": "mlp"}},
     "/nonexistent/fmnist"),
    ({"train": {"aggregate_on": "gpu"}}, "'train.aggregate_on' = 'gpu': expected one of 'auto', 'host', 'device'"),
    pytest.param({"train": {"device": "cuda"}}, "no GPU is visible", id="cuda-without-gpu",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")),
])
def test_bad_input_fails_fast_with_message(tmp_path, sections, message):
    cfg = small_config(tmp_path, **sections)
    proc, secs = run_cli(2, ["run", str(cfg)], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert secs < FAST
    assert not (tmp_path / "out.h5").exists()


def test_existing_output_is_refused_and_kept(tmp_path):
    cfg = small_config(tmp_path)
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious result")
    proc, secs = run_cli(2, ["run", str(cfg)], timeout=120)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert out.read_bytes() == b"precious result"
    assert secs < FAST


def test_overwrite_replaces_output(tmp_path):
    cfg = small_config(tmp_path, train={"rounds": 1})
    out = tmp_path / "out.h5"
    out.write_bytes(b"old")
    proc, _ = run_cli(2, ["run", str(cfg), "--overwrite", "--quiet"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"] == "completed"


def test_missing_config_file(tmp_path):
    proc, secs = run_cli(2, ["run", str(tmp_path / "nope.yaml")], timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr and secs < FAST


def test_rank_raising_mid_run_ends_the_job(tmp_path):
    cfg = small_config(tmp_path, train={"rounds": 50})
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet", "--set", fault("raise", rank=1, round=2)], timeout=120)
    assert proc.returncode != 0
    assert "injected fault on rank 1 in round 2" in proc.stderr
    assert secs < 15 + 5  # 15 s for the abort, plus Python start-up
    # the rounds finished before the failure are in the file (the killed ranks
    # may take a moment to release the file after mpiexec returns)
    deadline = time.monotonic() + 10
    while True:
        try:
            with h5py.File(tmp_path / "out.h5", "r") as f:
                assert f["metrics/round"].shape[0] >= 1
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
