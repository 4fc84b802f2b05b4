"""The MPI engine end to end under real ``mpiexec``: rank invariance, agreement
with a serial reference, exact byte accounting, the results file."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import yaml

from helpers import run_cli, small_config
from qmlhfl_mpi import config
from qmlhfl_mpi.config import build
from qmlhfl_mpi.core.codecs import make_codec
from reference import Reference, build_tree


def run_ok(n, cfg_path, *extra, timeout=300):
    proc, secs = run_cli(n, ["run", str(cfg_path), "--quiet", *extra], timeout=timeout)
    assert proc.returncode == 0, f"mpiexec -n {n} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def final_model(path):
    with h5py.File(path, "r") as f:
        return f["model/final"][()]


@pytest.mark.portable
def test_same_final_model_for_1_2_3_and_4_ranks(tmp_path):
    cfg = small_config(tmp_path, topology={"branching": [2, 2, 2]}, tau=[2, 2, 1],
                       quantizer={"levels": [2, 5, 0], "bucket": 8}, train={"rounds": 2})
    models, metrics = {}, {}
    for n in (1, 2, 3, 4):  # 8, 4, (2, 2, 4) and 2 devices per rank
        out = tmp_path / f"r{n}.h5"
        run_ok(n, cfg, "--set", f"output.path={out}")
        models[n] = final_model(out)
        with h5py.File(out) as f:
            metrics[n] = {k: f["metrics"][k][()] for k in ("uplink_bytes", "train_loss", "test_loss", "test_accuracy")}
            assert f.attrs["world_size"] == n
    assert np.isfinite(models[1]).all()
    for n in (2, 3, 4):
        assert np.array_equal(models[1], models[n]), f"{n} ranks differ from 1 rank"
        for key, value in metrics[1].items():  # the metrics too, not only the model
            assert np.array_equal(value, metrics[n][key]), (key, n)


CASES = {
    "N1-fedavg": dict(topology={"tree": 5}, tau=[3], quantizer={"levels": [4], "bucket": 16}),
    "N2-hier-local-qsgd": dict(topology={"branching": [2, 3]}, tau=[2, 3], quantizer={"levels": [3, 0], "bucket": 0}),
    "N3": dict(topology={"branching": [2, 2, 2]}, tau=[2, 2, 2], quantizer={"levels": [2, 6, 16], "bucket": 8}),
    "N3-unbalanced": dict(topology={"tree": [[3, 1], [2]]}, tau=[1, 2, 2], quantizer={"levels": [4, 8, 2], "bucket": 16}),
    "N2-unbalanced-samples": dict(topology={"tree": [4, 1, 2], "weighting": "samples"}, tau=[2, 2],
                                  quantizer={"levels": [5, 3], "bucket": 16}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_matches_serial_reference(tmp_path, case):
    # the unbatched path is the reference's arithmetic; vectorize: on agrees to round-off (tests below)
    path = small_config(tmp_path, train={"rounds": 2, "vectorize": "off"}, **CASES[case])
    raw = yaml.safe_load(path.read_text())
    cfg = config.load(path)
    tree = cfg.build_tree()
    ranks = min(3, tree.num_devices)
    run_ok(ranks, path)

    data = build.local_data(cfg, tree, range(tree.num_devices), 0, 1)
    model = build.model(cfg, data.input_shape, data.num_classes)
    topo = raw["topology"]
    root = build_tree(topo.get("tree"), topo.get("branching"))
    samples = data.samples if topo.get("weighting") == "samples" else None
    ref = Reference(root, cfg.tau, cfg.quantizer.levels, cfg.quantizer.bucket, cfg.train.lr,
                    cfg.train.batch_size, cfg.train.seed, model, data.train, samples)
    expected = ref.run(cfg.train.rounds)
    got = final_model(cfg.output.path)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), f"max abs diff {np.abs(got - expected).max()}"


def test_uplink_bytes_are_messages_times_formula(tmp_path):
    cfg_path = small_config(tmp_path, topology={"tree": [[3, 1], [2, 2]]}, tau=[2, 3, 2],
                            quantizer={"levels": [3, 255, 0], "bucket": 7}, train={"rounds": 3})
    run_ok(3, cfg_path)
    cfg = config.load(cfg_path)
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
    run_ok(2, cfg_path)
    cfg = config.load(cfg_path)
    with h5py.File(cfg.output.path) as f:
        for key in ("config_yaml", "version", "mpi_library", "world_size", "status"):
            assert key in f.attrs, key
        assert f.attrs["status"] == "completed" and f.attrs["world_size"] == 2
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
    cfg_path = small_config(tmp_path, train={"rounds": 20, "lr": 1e20},
                            model={"name": "logreg", "args": {}})
    proc, secs = run_cli(2, ["run", str(cfg_path), "--quiet"], timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "diverged" in proc.stderr and "train.lr=" in proc.stderr
    with h5py.File(config.load(cfg_path).output.path) as f:
        assert f.attrs["status"] == "diverged"
        rounds = f["metrics/round"].shape[0]
        assert 1 <= rounds < 20


def test_quickstart_config_learns(tmp_path):
    """The README's main job (fewer rounds): N = 3, 32 devices, layer-specific levels."""
    from helpers import REPO
    out = tmp_path / "quick.h5"
    proc, secs = run_cli(4, ["run", str(REPO / "configs" / "quickstart.yaml"), "--set", f"output.path={out}",
                             "--set", "train.rounds=10"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train_loss" in proc.stdout and "done: 10 rounds" in proc.stdout  # the per-round table
    with h5py.File(out) as f:
        acc = f["metrics/test_accuracy"][()]
        levels = f["quantizer/levels"][()]
        assert int(f.attrs["N"]) == 3 and f["topology/starts_0"].shape[0] - 1 >= 16
    assert len(set(levels.tolist())) == 3  # different quantizer on every link
    assert acc[-1] > acc[0] + 0.3 and acc[-1] > 0.6, acc


FMNIST = "/usr/share/datasets/fashion-mnist"


def test_fashion_mnist_run_is_rank_invariant_including_test_metrics(tmp_path):
    """Real images: the partition, the per-rank data and the chunked evaluation
    give the same model and the same metrics on 1 and 3 ranks."""
    import os
    if not os.path.isdir(FMNIST):
        pytest.skip(f"{FMNIST} missing: apt-get install dataset-fashion-mnist")
    cfg = small_config(tmp_path, data={"name": "fashion-mnist", "root": FMNIST,
                                       "partition": {"kind": "shards", "classes_per_device": 2}},
                       model={"name": "logreg", "args": {}}, train={"rounds": 2, "batch_size": 16})
    got = {}
    for n in (1, 3):
        out = tmp_path / f"f{n}.h5"
        run_ok(n, cfg, "--set", f"output.path={out}")
        with h5py.File(out) as f:
            got[n] = (f["model/final"][()], f["metrics/test_loss"][()], f["metrics/test_accuracy"][()],
                      f["topology/class_counts"][()])
    for a, b in zip(got[1], got[3]):
        assert np.array_equal(a, b)
    acc, counts = got[1][2], got[1][3]
    assert acc[-1] > 0.3  # 10 classes: well above chance after two rounds
    assert counts.shape == (6, 10) and counts.sum() == 60000
    assert ((counts > 0).sum(axis=1) <= 2).all()  # shards: at most 2 classes per device


def test_vectorize_on_is_bit_identical_for_any_rank_count(tmp_path):
    """Edges of 4 devices split over ranks (3 and 4 ranks), so batches differ with the rank count."""
    cfg = small_config(tmp_path, topology={"branching": [2, 4]}, tau=[3, 2], train={"rounds": 3, "vectorize": "on"},
                       quantizer={"levels": [4, 16], "bucket": 8})
    models, losses = {}, {}
    for n in (1, 2, 3, 4):
        out = tmp_path / f"v{n}.h5"
        run_ok(n, cfg, "--set", f"output.path={out}")
        with h5py.File(out) as f:
            models[n], losses[n] = f["model/final"][()], f["metrics/train_loss"][()]
    for n in (2, 3, 4):
        assert np.array_equal(models[1], models[n]) and np.array_equal(losses[1], losses[n]), n


def test_vectorize_on_agrees_with_off_to_round_off(tmp_path):
    """Float32 links (no stochastic rounding to amplify round-off): |on - off| <= 1e-5 after 3 rounds."""
    cfg = small_config(tmp_path, topology={"branching": [2, 3]}, tau=[3, 2], train={"rounds": 3},
                       quantizer={"levels": [0, 0], "bucket": 8})
    res = {}
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.h5"
        run_ok(2, cfg, "--set", f"output.path={out}", "--set", f"train.vectorize={mode}")
        with h5py.File(out) as f:
            res[mode] = f["model/final"][()], f["metrics/train_loss"][()]
    assert np.max(np.abs(res["on"][0] - res["off"][0])) <= 1e-5
    assert np.allclose(res["on"][1], res["off"][1], rtol=1e-5)


def test_vectorize_on_refuses_a_model_with_dropout(tmp_path):
    plugin = tmp_path / "drop.py"
    plugin.write_text("from torch import nn\n"
                      "def build(shape, k):\n"
                      "    return nn.Sequential(nn.Linear(shape[0], 4), nn.Dropout(0.2), nn.Linear(4, k))\n")
    cfg = small_config(tmp_path, model={"name": f"{plugin}:build", "args": {}}, train={"vectorize": "on"})
    proc, _ = run_cli(2, ["run", str(cfg), "--quiet"], timeout=120)
    assert proc.returncode == 2 and "train.vectorize: on" in proc.stderr and "dropout" in proc.stderr
