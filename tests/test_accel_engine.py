"""``train.aggregate_on: device`` end to end under real ``mpiexec``, on CPU tensors (the arithmetic a
GPU run does, on the CPU): bit for bit the host backend's models and metrics on any rank count, exact
resume after a killed rank, and batched training on the device path.  (Against the independent serial
reference: ``test_options_engine.py::test_engine_matches_serial_reference_with_options``.)"""
from __future__ import annotations

import h5py
import numpy as np

from helpers import killed_run, small_config
from test_options_engine import EVERYTHING, METRICS, final_model, read_all, run_ok

DEVICE = "train.aggregate_on=device"


def test_device_aggregation_equals_the_host_on_any_rank_count_and_resumes_exactly(tmp_path):
    cfg = small_config(tmp_path, **EVERYTHING)
    host = tmp_path / "host.h5"
    proc = run_ok(2, cfg, "--set", f"output.path={host}", "--set", "train.aggregate_on=host")
    model_h, metrics_h = read_all(host)
    with h5py.File(host) as f:
        assert f.attrs["aggregation"] == "host"
    for n in (1, 3):
        out = tmp_path / f"dev{n}.h5"
        proc = run_ok(n, cfg, "--set", f"output.path={out}", "--set", DEVICE, "--log-level", "INFO")
        model, metrics = read_all(out)
        assert np.array_equal(model, model_h), f"device aggregation on {n} ranks differs from the host's"
        for k in METRICS:  # bytes and messages included: the same messages of the same lengths
            assert np.array_equal(metrics[k], metrics_h[k]), (k, n)
    # rank 0 says where the aggregation runs and which link goes through the host (top-k has no device form)
    assert "aggregation on torch:cpu; through the host" in proc.stderr and "uplink 1 (topk" in proc.stderr
    # a rank dies after round 3's checkpoint (residuals and server state on the device); resume on 2 ranks
    out = tmp_path / "killed.h5"
    state = killed_run(3, cfg, out, DEVICE)
    assert any(k.startswith("server.") for k in state) and any(k.startswith("residual.") for k in state), state
    run_ok(2, cfg, "--set", f"output.path={out}", "--set", DEVICE, "--resume")
    model, metrics = read_all(out)
    assert np.array_equal(model, model_h)
    for k in METRICS:
        assert np.array_equal(metrics[k], metrics_h[k]), k


def test_batched_training_on_the_device_path_is_rank_invariant_and_equals_the_host(tmp_path):
    sections = dict(topology={"tree": [[5, 3], [4]]}, tau=[3, 2, 1],
                    quantizer={"levels": [8, 8, 16], "bucket": 16, "error_feedback": [True, False, False],
                               "downlink": [0, 0, 8]},
                    server={"optimizer": ["avg", "momentum", "avg"]},
                    train={"rounds": 3, "vectorize": "on", "momentum": 0.9})
    cfg = small_config(tmp_path, **sections)
    models = {}
    for n, backend in ((1, "device"), (3, "device"), (2, "host")):
        out = tmp_path / f"{backend}{n}.h5"
        run_ok(n, cfg, "--set", f"output.path={out}", "--set", f"train.aggregate_on={backend}")
        models[(n, backend)] = final_model(out)
    assert np.array_equal(models[(1, "device")], models[(3, "device")])
    assert np.array_equal(models[(1, "device")], models[(2, "host")])
