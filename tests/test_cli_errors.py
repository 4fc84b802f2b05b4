"""Bad input and failures: a clear message, exit 2 (or the documented code) within seconds, no hang, nothing
overwritten.  Each check runs in process (``load_config`` and ``Session`` on ``COMM_SELF``: what the CLI
runs); the agreement itself, one message from every rank of a real job, is checked end to end under
``mpiexec -n 2`` for a config error, an oversized tree and a rank that fails mid-run."""
from __future__ import annotations

import time

import h5py
import pytest
from mpi4py import MPI

from fault_plugin import spec as fault
from helpers import run_cli, small_config
from qmlhfl_mpi import ConfigError, RunError, Session, load_config
from qmlhfl_mpi.core.topology import RankLayout, TopologyError

FAST = 20  # seconds: start-up of two Python ranks plus the check, with margin on a loaded machine


def refusal(cfg_path, **run):
    """The message and exit code with which loading or starting the config fails, in this process."""
    try:
        Session(load_config(str(cfg_path)), MPI.COMM_SELF).run(**run)
    except ConfigError as e:
        return str(e), 2
    except RunError as e:
        return str(e), e.code
    raise AssertionError("the run did not fail")


@pytest.mark.portable
@pytest.mark.parametrize("sections,message", [
    ({"tau": [2]}, "'tau' = [2]: the tree has N=2 layers, so give 2 values"),
    ({"quantizer": {"levels": [4, -2]}}, "'quantizer.levels[1]' = -2: expected an integer from 0 to 32767"),
    ({"data": {"name": "fashion-mnist", "root": "/nonexistent/fmnist"}, "model": {"name": "mlp"}},
     "/nonexistent/fmnist"),
    ({"train": {"aggregate_on": "gpu"}}, "'train.aggregate_on' = 'gpu': expected one of 'auto', 'host', 'device'"),
    pytest.param({"train": {"device": "cuda"}}, "no GPU is visible", id="cuda-without-gpu",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")),
])
def test_bad_input_fails_fast_with_message(tmp_path, sections, message):
    cfg = small_config(tmp_path, **sections)
    t0 = time.monotonic()
    text, code = refusal(cfg)
    assert code == 2 and message in text, text
    assert time.monotonic() - t0 < FAST
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("sections,message", [
    ({"system": {"speed": "lognormal(-1)"}}, "'system.speed' = 'lognormal(-1)': lognormal takes 1 number(s) (sigma)"),
    ({"system": {"jitter": "normal(0.1)"}}, "'system.jitter' = 'normal(0.1)': expected one of constant, lognormal"),
    ({"system": {"down_rate": [-1, 0]}}, "'system.down_rate[0]' = -1"),
    ({"latency": {"uplink_rate": [0, 1e8]}}, "'latency.uplink_rate[0]' = 0"),
    ({"system": {"contention": ["shared"]}}, "'system.contention' = ['shared']: the tree has N=2 layers"),
    ({"system": {"availability_period": 5}}, "system.availability_trace is empty"),
    ({"aggregation": {"policy": ["deadline", "all"]}}, "layer 1 has policy deadline, so give it a deadline > 0"),
    ({"aggregation": {"policy": ["first_k", "all"], "k": [0, 0]}}, "layer 1 has policy first_k, so give it k >= 1"),
    ({"aggregation": {"policy": ["fastest", "all"]}}, "'aggregation.policy[0]' = 'fastest'"),
    ({"aggregation": {"policy": ["deadline", "all"], "deadline": [1e-9, 0], "min_children": [0, 1]}},
     "no child of a layer-1 node meets its deadline of 1e-09 s in the first round"),
    ({"system": {"device_trace": "/nonexistent/devices.csv"}},
     "'system.device_trace' = '/nonexistent/devices.csv': no such file"),
])
def test_bad_system_and_aggregation_settings_name_the_key(tmp_path, sections, message):
    text, code = refusal(small_config(tmp_path, **sections))
    assert code == 2 and message in text, text
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("key,text,message", [
    ("device_trace", "device,step_seconds\n0,fast\n", "line 2, column 'step_seconds' = 'fast'"),
    ("device_trace", "device;step_seconds\n0;1\n", "missing column(s)"),
    ("availability_trace", "device,online,offline\n6,0,1\n", "column 'device' has 6; expected device ids 0..5"),
    ("link_trace", "link,child,up_rate\n3,0,1e6\n", "column 'link' has 3; expected links 1..2"),
    ("link_trace", "link,child,up_rate\n1,0,1e6\n1,0,2e6\n", "line 3: link 1, child 0 appears on an earlier row"),
])
def test_broken_trace_files_name_the_key_the_file_and_the_line(tmp_path, key, text, message):
    trace = tmp_path / "trace.csv"
    trace.write_text(text)
    got, code = refusal(small_config(tmp_path, system={key: str(trace)}))
    assert code == 2 and message in got and f"system.{key}" in got and str(trace) in got, got


@pytest.mark.portable
def test_a_broken_trace_is_one_message_from_a_real_job(tmp_path):
    """Read on every rank while the runtime is built: agreed, one message, exit 2 on every rank."""
    trace = tmp_path / "devices.csv"
    trace.write_text("device,step_seconds\n0,-0.5\n")
    cfg = small_config(tmp_path, system={"device_trace": str(trace)})
    proc, secs = run_cli(2, ["run", str(cfg)], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("qmlhfl-mpi: error:") == 1 and "'system.device_trace'" in proc.stderr
    assert "column 'step_seconds' has -0.5; expected numbers > 0" in proc.stderr and "Traceback" not in proc.stderr
    assert secs < FAST and not (tmp_path / "out.h5").exists()


def test_too_many_ranks_for_the_tree_names_the_rank_counts_that_work():
    with pytest.raises(TopologyError, match="2 MPI ranks cannot host a tree of 1 devices"):
        RankLayout.build(load_config(dict(topology={"tree": 1}, tau=[1], quantizer={"levels": [4]})).build_tree(), 2)


@pytest.mark.portable
def test_a_config_error_is_one_message_from_a_real_job(tmp_path):
    cfg = small_config(tmp_path, train={"lr": 0.1, "learnig_rate": 1})
    proc, secs = run_cli(2, ["run", str(cfg)], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("qmlhfl-mpi: error:") == 1 and "unknown config key(s) 'train.learnig_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert secs < FAST
    assert not (tmp_path / "out.h5").exists()


def test_existing_output_is_refused_and_kept(tmp_path):
    cfg = small_config(tmp_path)
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious result")
    text, code = refusal(cfg)
    assert code == 2 and "already exists" in text and "--overwrite" in text
    assert out.read_bytes() == b"precious result"


def test_overwrite_replaces_output(tmp_path):
    cfg = small_config(tmp_path, train={"rounds": 1})
    out = tmp_path / "out.h5"
    out.write_bytes(b"old")
    assert Session(load_config(str(cfg)), MPI.COMM_SELF).run(overwrite=True).status == "completed"
    with h5py.File(out) as f:
        assert f.attrs["status"] == "completed"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.portable
def test_rank_raising_mid_run_ends_the_job(tmp_path):
    cfg = small_config(tmp_path, train={"rounds": 50})
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet", "--set", fault("raise", rank=1, round=2)], timeout=120)
    assert proc.returncode == 1, proc.stderr  # aborted after an unexpected error (docs/hpc.md)
    assert "injected fault on rank 1 in round 2" in proc.stderr
    assert secs < 15 + 5  # rank 0 hears of the failure at its next wait; plus Python start-up
    # rank 0 recorded the failure with rank 1's message in a readable file holding the finished rounds, and
    # released the lock and the space reserve before the job ended
    deadline = time.monotonic() + 10
    while True:
        try:
            with h5py.File(tmp_path / "out.h5", "r") as f:
                assert f["metrics/round"][()].tolist() == [0, 1]
                assert f.attrs["status"] == "failed"
                assert "rank 1 failed" in f.attrs["status_message"] and "injected fault" in f.attrs["status_message"]
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert not (tmp_path / "out.h5.lock").exists() and not (tmp_path / "out.h5.reserve").exists()


@pytest.mark.portable
def test_an_oversized_tree_is_refused_on_every_rank_in_seconds(tmp_path):
    cfg = small_config(tmp_path, topology={"branching": [100000, 100000]})  # a typo: 10^10 devices
    proc, secs = run_cli(2, ["run", str(cfg)], timeout=120)
    assert proc.returncode == 2, proc.stderr  # every rank exits 2 (a rank killed for memory would be 9 or 137)
    assert proc.stderr.count("qmlhfl-mpi: error:") == 1, proc.stderr  # one message, from rank 0
    assert "needs an estimated" in proc.stderr and "10,000,000,000 devices" in proc.stderr
    assert "A tree of this shape fits with at most" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert secs < FAST
    assert sorted(p.name for p in tmp_path.iterdir()) == [cfg.name]  # nothing written
