"""The engine in process (``Session`` on ``COMM_SELF``): exact byte accounting, the results file, divergence,
batched against unbatched training; and the README's main job end to end under ``mpiexec -n 4``.  Rank
invariance on 1 to 4 ranks and the serial reference: tests/mpi/test_engine_matrix.py."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import yaml
from mpi4py import MPI

from helpers import REPO, run_cli, small_config
from qmlhfl_mpi import RunError, Session, config
from qmlhfl_mpi.core.codecs import make_codec


def run_here(cfg_path, **overrides):
    """Run the config file in this process; ``overrides`` are ``--set`` pairs."""
    cfg = config.load(cfg_path, [f"{k}={v}" for k, v in overrides.items()])
    summary = Session(cfg, MPI.COMM_SELF).run()
    return cfg, summary


def test_uplink_bytes_are_messages_times_formula(tmp_path):
    cfg_path = small_config(tmp_path, topology={"tree": [[3, 1], [2, 2]]}, tau=[2, 3, 2],
                            quantizer={"levels": [3, 255, 0], "bucket": 7}, train={"rounds": 3})
    cfg, _ = run_here(cfg_path)
    with h5py.File(cfg.output.path) as f:
        ub = f["metrics/uplink_bytes"][()]
        d = int(f.attrs["num_params"])
        msg = f["quantizer/message_bytes"][()]
    assert ub.shape == (3, 3)
    # hand count: devices 8, layer-1 nodes 4, layer-2 nodes 2; tau = (2, 3, 2)
    messages = [8 * 3 * 2, 4 * 2, 2 * 1]
    s = cfg.quantizer.levels
    per_msg = [4 * math.ceil(d / 7) + math.ceil(d * 3 / 8),      # s=3: 2 level bits + sign
               4 * math.ceil(d / 7) + math.ceil(d * 9 / 8),      # s=255: 8 level bits + sign
               4 * d]                                            # none: float32
    assert msg.tolist() == per_msg == [make_codec(x, 7).nbytes(d) for x in s]
    for row in ub:
        assert row.tolist() == [m * b for m, b in zip(messages, per_msg)]


def test_results_file_schema(tmp_path):
    cfg_path = small_config(tmp_path, train={"rounds": 3, "eval_every": 2})
    cfg, _ = run_here(cfg_path)
    with h5py.File(cfg.output.path) as f:
        for key in ("config_yaml", "version", "mpi_library", "world_size", "status"):
            assert key in f.attrs, key
        assert f.attrs["status"] == "completed" and f.attrs["world_size"] == 1
        assert config.from_dict(yaml.safe_load(f.attrs["config_yaml"])) == cfg
        m = f["metrics"]
        assert m["round"][()].tolist() == [0, 1, 2]
        for key in ("test_accuracy", "test_loss", "train_loss", "time_compute", "time_codec", "time_comm"):
            assert m[key].shape == (3,), key
        acc = m["test_accuracy"][()]
        assert np.isnan(acc[0]) and np.isfinite(acc[1]) and np.isfinite(acc[2])  # eval_every=2 and the last round
        assert 0 <= acc[2] <= 1
        assert np.all(m["time_compute"][()] > 0) and np.all(m["time_comm"][()] >= 0)
        assert m["uplink_bytes"].shape == (3, 2)
        assert f["model/final"].dtype == np.float32
        assert f["model/final"].shape == (int(f.attrs["num_params"]),)


def test_diverging_run_stops_with_advice_and_keeps_results(tmp_path):
    cfg_path = small_config(tmp_path, train={"rounds": 20, "lr": 1e20}, model={"name": "logreg", "args": {}})
    cfg, summary = run_here(cfg_path)
    assert summary.status == "diverged" and "train.lr=" in summary.message  # the CLI exits 3: test_theory_engine
    with h5py.File(cfg.output.path) as f:
        assert f.attrs["status"] == "diverged"
        rounds = f["metrics/round"].shape[0]
        assert 1 <= rounds < 20


def test_quickstart_config_learns(tmp_path):
    """The README's main job (fewer rounds): N = 3, 32 devices, layer-specific levels, under mpiexec -n 2 (the
    README's 4 ranks busy-wait on these 2 cores; rank invariance is tests/mpi's)."""
    out = tmp_path / "quick.h5"
    proc, secs = run_cli(2, ["run", str(REPO / "configs" / "quickstart.yaml"), "--set", f"output.path={out}",
                             "--set", "train.rounds=10"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train_loss" in proc.stdout and "done: 10 rounds" in proc.stdout  # the per-round table
    with h5py.File(out) as f:
        acc = f["metrics/test_accuracy"][()]
        levels = f["quantizer/levels"][()]
        assert int(f.attrs["N"]) == 3 and f["topology/starts_0"].shape[0] - 1 >= 16
    assert len(set(levels.tolist())) == 3  # different quantizer on every link
    assert acc[-1] > acc[0] + 0.3 and acc[-1] > 0.6, acc


def test_vectorize_on_agrees_with_off_to_round_off(tmp_path):
    """Float32 links (no stochastic rounding to amplify round-off): |on - off| <= 1e-5 after 3 rounds."""
    cfg_path = small_config(tmp_path, topology={"branching": [2, 3]}, tau=[3, 2], train={"rounds": 3},
                            quantizer={"levels": [0, 0], "bucket": 8})
    res = {}
    for mode in ("on", "off"):
        cfg, _ = run_here(cfg_path, **{"output.path": tmp_path / f"{mode}.h5", "train.vectorize": mode})
        with h5py.File(cfg.output.path) as f:
            res[mode] = f["model/final"][()], f["metrics/train_loss"][()]
    assert np.max(np.abs(res["on"][0] - res["off"][0])) <= 1e-5
    assert np.allclose(res["on"][1], res["off"][1], rtol=1e-5)


def test_vectorized_training_with_options_is_close_to_unbatched(tmp_path):
    """Client momentum, weight decay, a cosine schedule, error feedback and a server optimiser: batched products
    round differently, float32 round-off amplified a little over 3 rounds."""
    cfg_path = small_config(tmp_path, topology={"tree": [[5, 3], [4]]}, tau=[3, 2, 1],
                            quantizer={"levels": [8, 8, 16], "bucket": 16, "error_feedback": [True, False, False]},
                            participation={"fraction": [0.7, 1.0, 1.0]}, server={"optimizer": ["avg", "momentum", "avg"]},
                            train={"rounds": 3, "vectorize": "on", "momentum": 0.9, "weight_decay": 1e-3,
                                   "lr_schedule": "cosine"})
    models = {}
    for mode in ("on", "off"):
        cfg, _ = run_here(cfg_path, **{"output.path": tmp_path / f"{mode}.h5", "train.vectorize": mode})
        with h5py.File(cfg.output.path) as f:
            models[mode] = f["model/final"][()]
    np.testing.assert_allclose(models["on"], models["off"], rtol=0, atol=1e-4)


def test_vectorize_on_refuses_a_model_with_dropout(tmp_path):
    plugin = tmp_path / "drop.py"
    plugin.write_text("from torch import nn\n"
                      "def build(shape, k):\n"
                      "    return nn.Sequential(nn.Linear(shape[0], 4), nn.Dropout(0.2), nn.Linear(4, k))\n")
    cfg = small_config(tmp_path, model={"name": f"{plugin}:build", "args": {}}, train={"vectorize": "on"})
    with pytest.raises(RunError) as info:
        Session(config.load(cfg), MPI.COMM_SELF)
    assert info.value.code == 2 and "train.vectorize: on" in str(info.value) and "dropout" in str(info.value)
