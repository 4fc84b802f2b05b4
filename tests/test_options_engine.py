"""Issue-10 options end to end under real ``mpiexec``: sampling, availability, client and
server optimisers, the codec family, error feedback and downlink quantization against the
independent serial reference (``tests/reference.py``), rank invariance with everything on,
exact resume, and the per-link byte and message counts."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import yaml

from helpers import killed_run, run_cli, small_config
from qmlhfl_mpi import config
from qmlhfl_mpi.config import build
from qmlhfl_mpi.config.schema import server_betas
from reference import Reference, build_tree


def run_ok(n, cfg_path, *extra, timeout=300):
    proc, _ = run_cli(n, ["run", str(cfg_path), "--quiet", *extra], timeout=timeout)
    assert proc.returncode == 0, f"mpiexec -n {n} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def final_model(path):
    with h5py.File(path, "r") as f:
        return f["model/final"][()]


METRICS = ("uplink_bytes", "messages", "downlink_bytes", "train_loss", "test_loss", "test_accuracy")

# each case: config sections, and what the reference needs beyond the config
CASES = {
    "N1-sampling-renormalize": dict(
        topology={"tree": 6}, tau=[2], quantizer={"levels": [4], "bucket": 16},
        participation={"fraction": [0.5]}),
    "N2-sampling-unbiased-availability": dict(
        topology={"branching": [2, 3]}, tau=[2, 2], quantizer={"levels": [3, 8], "bucket": 16},
        participation={"fraction": [0.67, 1.0], "availability": [0.7, 1.0], "weighting": "unbiased"}),
    "N3-server-optimizers-downlink": dict(
        topology={"branching": [2, 2, 2]}, tau=[2, 2, 1], quantizer={"levels": [2, 6, 16], "bucket": 8,
                                                                    "downlink": [8, 0, 16]},
        server={"optimizer": ["momentum", "avg", "adam"], "lr": [1.0, 1.0, 0.05], "momentum": [0.5, 0.9, 0.9]}),
    "N3-unbalanced-everything": dict(
        topology={"tree": [[3, 1], [2]]}, tau=[1, 2, 2],
        quantizer={"levels": [4, 8, 2], "bucket": 16, "kind": ["topk", "sign", "qsgd"],
                   "topk_fraction": [0.2, 0.01, 0.01], "error_feedback": [True, True, False],
                   "downlink": [0, 4, 8]},
        participation={"fraction": [0.5, 1.0, 1.0], "availability": [1.0, 0.8, 1.0]},
        server={"optimizer": ["avg", "yogi", "momentum"], "betas": [0.8, 0.95]},
        train={"momentum": 0.9, "prox_mu": 0.1, "lr_schedule": "step", "lr_step_rounds": 1, "lr_gamma": 0.5}),
    "N2-samples-round-tensor-client": dict(
        topology={"tree": [4, 1, 2], "weighting": "samples"}, tau=[2, 2],
        quantizer={"levels": [5, 3], "bucket": "tensor", "kind": ["round", "qsgd"]},
        participation={"fraction": [0.5, 1.0], "weighting": "unbiased"},
        train={"momentum": 0.5, "nesterov": True, "weight_decay": 0.01, "lr_schedule": "cosine"}),
}


def reference_for(cfg, raw, data, model):
    topo = raw["topology"]
    root = build_tree(topo.get("tree"), topo.get("branching"))
    q, t, s = cfg.quantizer, cfg.train, cfg.server
    N = cfg.N
    server = []
    betas = server_betas(s.betas, N)
    for n in range(N):
        par = {"betas": betas[n]}
        for key in ("lr", "momentum", "eps"):
            if getattr(s, key):
                par[key] = getattr(s, key)[n]
        server.append((s.optimizer[n] if s.optimizer else "avg", par))
    client = {k: getattr(t, k) for k in ("momentum", "nesterov", "weight_decay", "prox_mu") if getattr(t, k)}
    schedule = build.lr_schedule(cfg)
    return Reference(
        root, cfg.tau, q.levels, q.bucket, t.lr, t.batch_size, t.seed, model, data.train,
        data.samples if cfg.topology.weighting == "samples" else None,
        kinds=list(q.kind) or None, fraction=list(cfg.participation.fraction) or None,
        availability=list(cfg.participation.availability) or None, weighting=cfg.participation.weighting,
        server=server, error_feedback=list(q.error_feedback) or None, downlink=list(q.downlink) or None,
        client=client, lr_at=schedule.at if schedule else None,
        tensor_sizes=tuple(p.numel() for p in model.parameters()),
        fractions=list(q.topk_fraction) or None)


@pytest.mark.parametrize("backend,ranks", [("host", 3), ("device", 2)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_matches_serial_reference_with_options(tmp_path, case, backend, ranks):
    """Host aggregation, and device aggregation (``train.aggregate_on: device``: torch tensors, here on
    the CPU), against the serial reference."""
    sections = dict(CASES[case])
    sections["train"] = {"rounds": 3, "vectorize": "off", "aggregate_on": backend, **sections.get("train", {})}
    path = small_config(tmp_path, **sections)
    raw = yaml.safe_load(path.read_text())
    cfg = config.load(path)
    tree = cfg.build_tree()
    run_ok(min(ranks, tree.num_devices), path)
    data = build.local_data(cfg, tree, range(tree.num_devices), 0, 1)
    model = build.model(cfg, data.input_shape, data.num_classes)
    expected = reference_for(cfg, raw, data, model).run(cfg.train.rounds)
    with h5py.File(cfg.output.path) as f:
        assert f.attrs["aggregation"] == {"host": "host", "device": "torch:cpu"}[backend]
        assert f.attrs["train_device"] == "cpu"
    got = final_model(cfg.output.path)
    assert np.isfinite(expected).all()
    assert np.array_equal(got, expected), f"max abs diff {np.abs(got - expected).max()}"


EVERYTHING = dict(
    topology={"tree": [[3, 2], [1, 2]]}, tau=[2, 2, 1],
    quantizer={"levels": [4, 8, 16], "bucket": 8, "kind": ["topk", "qsgd", "qsgd"], "topk_fraction": [0.25, 0.01, 0.01],
               "error_feedback": [True, True, False], "downlink": [0, 8, 16]},
    participation={"fraction": [0.6, 1.0, 1.0], "availability": [1.0, 0.75, 1.0]},
    server={"optimizer": ["momentum", "avg", "adam"], "lr": [1.0, 1.0, 0.05]},
    train={"rounds": 6, "momentum": 0.9, "vectorize": "off"},
    output={"path": "out.h5", "checkpoint_every": 1},
)


def read_all(path):
    with h5py.File(path) as f:
        return f["model/final"][()], {k: f["metrics"][k][()] for k in METRICS}


def test_everything_on_is_rank_invariant_and_resumes_exactly(tmp_path):
    cfg = small_config(tmp_path, **EVERYTHING)
    runs = {}
    for n in (1, 2, 4):
        out = tmp_path / f"r{n}.h5"
        run_ok(n, cfg, "--set", f"output.path={out}")
        runs[n] = read_all(out)
    model1, metrics1 = runs[1]
    assert np.isfinite(model1).all()
    for n in (2, 4):
        assert np.array_equal(model1, runs[n][0]), f"{n} ranks differ from 1"
        for k in METRICS:
            assert np.array_equal(metrics1[k], runs[n][1][k]), (k, n)
    # a rank dies after round 3's checkpoint; resume on 3 ranks ends bit-identical (server state, residuals)
    out = tmp_path / "killed.h5"
    state = killed_run(2, cfg, out)
    assert any(k.startswith("server.1.") for k in state) and any(k.startswith("server.3.") for k in state), state
    assert any(k.startswith("residual.1.") for k in state) and any(k.startswith("residual.2.") for k in state), state
    run_ok(3, cfg, "--set", f"output.path={out}", "--resume")
    model, metrics = read_all(out)
    assert np.array_equal(model, model1)
    for k in METRICS:
        assert np.array_equal(metrics[k], metrics1[k]), k


def test_bytes_equal_messages_times_exact_lengths(tmp_path):
    cfg_path = small_config(tmp_path, **{**EVERYTHING, "train": {"rounds": 30, "eval_every": 30, "vectorize": "off"},
                                         "output": {"path": "out.h5"}})
    run_ok(2, cfg_path)
    cfg = config.load(cfg_path)
    tree = cfg.build_tree()
    with h5py.File(cfg.output.path) as f:
        ub, msgs, down = f["metrics/uplink_bytes"][()], f["metrics/messages"][()], f["metrics/downlink_bytes"][()]
        L, Ld = f["quantizer/message_bytes"][()], f["quantizer/downlink_bytes"][()]
        expected = f["quantizer/expected_messages_per_round"][()]
        d = int(f.attrs["num_params"])
    assert np.array_equal(ub, msgs * L[None, :])  # every message has its exact length
    k = math.ceil(0.25 * d)  # topk: k float32 values and k indices of ceil(log2 d) bits
    assert L[0] == 4 * k + math.ceil(k * max(1, math.ceil(math.log2(d))) / 8)
    assert Ld[0] == 4 * d and Ld[1] == 4 * math.ceil(d / 8) + math.ceil(d * 5 / 8)  # float32; s=8: 4+1 bits
    # link 3 (cloud, everyone takes part at layer 3): 2 children, one broadcast every round
    assert (down[:, 2] == 2 * Ld[2]).all()
    assert (msgs[:, 2] == 2).all()
    # link 1: f = 0.6 of 5/3 devices under the layer-1 nodes; link 2 availability 0.75 -> fewer than the full count
    full = [tree.num_nodes(0) * 2, tree.num_nodes(1) * 1]
    assert (msgs[:, 0] < full[0]).all() and msgs[:, 1].min() < full[1]
    for n in range(2):  # the mean over 30 rounds is near the expected count (a 4-sigma binomial-type band)
        mean = msgs[:, n].mean()
        assert abs(mean - expected[n]) < 4 * math.sqrt(expected[n] / len(msgs)) + 0.5, (n, mean, expected[n])


def test_vectorized_training_with_options_is_rank_invariant_and_close_to_unbatched(tmp_path):
    sections = dict(topology={"tree": [[5, 3], [4]]}, tau=[3, 2, 1],
                    quantizer={"levels": [8, 8, 16], "bucket": 16, "error_feedback": [True, False, False]},
                    participation={"fraction": [0.7, 1.0, 1.0]}, server={"optimizer": ["avg", "momentum", "avg"]},
                    train={"rounds": 3, "vectorize": "on", "momentum": 0.9, "weight_decay": 1e-3,
                           "lr_schedule": "cosine"})
    cfg = small_config(tmp_path, **sections)
    models = {}
    for n in (1, 3):
        out = tmp_path / f"v{n}.h5"
        run_ok(n, cfg, "--set", f"output.path={out}")
        models[n] = final_model(out)
    assert np.array_equal(models[1], models[3])
    out = tmp_path / "off.h5"
    run_ok(2, cfg, "--set", f"output.path={out}", "--set", "train.vectorize=off")
    # batched products round differently: float32 round-off, amplified a little over 3 rounds
    np.testing.assert_allclose(models[1], final_model(out), rtol=0, atol=1e-4)
