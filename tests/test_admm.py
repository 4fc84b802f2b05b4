"""ADMM at the edges (core/admm.py, admm: in the config; docs/algorithms.md): the rule reaches the consensus
optimum with exact local solves, the engine equals the serial reference bit for bit (sampling, error feedback,
momentum), keeps a checkpointed dual per device that trained, and refuses what it cannot combine with, naming
the key.  On 1-4 ranks, stopped and resumed on another rank count: tests/mpi/test_engine_matrix.py, case
N3-admm-edges-sampled."""
from __future__ import annotations

import copy
import math

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from helpers import REPO, SMALL
from qmlhfl_mpi import Session, load_config
from qmlhfl_mpi.config import ConfigError
from qmlhfl_mpi.core.admm import Admm
from qmlhfl_mpi.results import read_checkpoint
from reference import reference_for


def test_the_rule_reaches_the_consensus_optimum_with_exact_local_solves():
    """f_i(x) = ||x - b_i||^2 / 2: the augmented local problem's minimiser is (b_i + rho z_i) / (1 + rho) with
    the anchor z_i = v - y_i / rho; averaging the augmented models drives v to the mean of the b_i, the duals
    to b_i - mean (so they add up to 0), and the devices' models to v."""
    rng = np.random.default_rng(0)
    b = rng.standard_normal((5, 7)).astype(np.float32) * 3
    admm = Admm(0.5)
    v, duals = np.zeros(7, dtype=np.float32), [None] * 5
    for _ in range(200):
        sent = []
        for i in range(5):
            x = (b[i] + np.float32(0.5) * admm.anchor(v, duals[i])) / np.float32(1.5)
            duals[i], aug = admm.step(x, v, duals[i])
            sent.append(aug)
        v = np.mean(sent, axis=0, dtype=np.float32)
    assert np.allclose(v, b.mean(axis=0), atol=1e-5)
    assert np.allclose(np.sum(duals, axis=0), 0, atol=1e-4)
    assert np.allclose(np.stack(duals), b - b.mean(axis=0), atol=1e-4)
    with pytest.raises(ValueError, match=r"admm.rho = 0: must be > 0"):
        Admm(0)


ADMM = dict(topology={"branching": [2, 3]}, tau=[2, 2], participation={"fraction": [0.67, 1]},
            quantizer={"levels": [4, 8], "bucket": 16, "error_feedback": [True, False]},
            admm={"layer": 1, "rho": 0.5})


def run_here(tmp_path, name, rounds=4, **sections):
    raw = copy.deepcopy(SMALL)
    raw.update(copy.deepcopy(sections))
    raw["train"] = {**SMALL["train"], **sections.get("train", {}), "rounds": rounds}
    raw["output"] = {"path": str(tmp_path / f"{name}.h5")}
    Session(load_config(raw), MPI.COMM_SELF).run()
    with h5py.File(tmp_path / f"{name}.h5") as f:
        return f["model/final"][()], raw


def test_admm_against_the_reference_and_averaging(tmp_path):
    """Edges that sample 2 of 3 devices, error feedback on the device link, momentum in the local solves, the
    trainer left to choose (ADMM trains one device at a time): the reference's model bit for bit; not the
    averaging run's; the checkpoint holds one dual per device that has trained, on its device's rank."""
    sections = {**ADMM, "train": {"momentum": 0.5, "vectorize": "auto"}}
    got, raw = run_here(tmp_path, "admm", **sections)
    assert np.array_equal(reference_for(load_config(raw)).run(4), got) and np.isfinite(got).all()
    avg, _ = run_here(tmp_path, "avg", **{**sections, "admm": {"layer": 0}})
    assert not np.array_equal(avg, got)
    raw["output"]["checkpoint_every"] = 1
    raw["output"]["path"] = str(tmp_path / "kept.h5")
    from qmlhfl_mpi.run.callbacks import Callback

    class StopAfter(Callback):
        def on_round_end(self, session, record):
            return record["round"] >= 1

    Session(load_config(raw), MPI.COMM_SELF).run(callbacks=[StopAfter()])
    state = read_checkpoint(tmp_path / "kept.h5.ckpt").state
    duals = sorted(int(k.split(".")[2]) for k in state if k.startswith("dual."))
    assert duals and set(duals) <= set(range(6)) and all(state[f"dual.1.{i}"].size == got.size for i in duals)


def test_the_example_runs_and_differs_from_averaging_under_edge_level_heterogeneity(tmp_path):
    """configs/examples/admm.yaml (edge-shards, quantized links) for 4 rounds: finite, and a different model from
    plain averaging's."""
    example = str(REPO / "configs/examples/admm.yaml")
    out = {}
    for layer in (1, 0):
        cfg = load_config(example, ["train.rounds=4", f"admm.layer={layer}", "train.vectorize=off",
                                    f"output.path={tmp_path / str(layer)}.h5"])
        Session(cfg, MPI.COMM_SELF).run()
        with h5py.File(tmp_path / f"{layer}.h5") as f:
            out[layer] = f["model/final"][()]
    assert np.isfinite(out[1]).all() and not np.array_equal(out[1], out[0])


@pytest.mark.parametrize("layer, tree, tau, fraction", [
    (2, [2, 2, 2], [2, 2, 1], [0.5, 1.0, 1.0]),   # the regional servers with their edges as clients
    (3, [2, 2, 2], [1, 2, 2], [1.0, 0.5, 1.0]),   # the cloud with its regions as clients
    (2, [2, 3], [2, 2], [0.67, 1.0]),             # N = 2: the cloud with its edges
])
def test_admm_above_the_edges_against_the_reference(tmp_path, layer, tree, tau, fraction):
    """ADMM at layer L >= 2: each subtree trains toward its anchor and takes the dual step at its send-up.  The
    reference's model bit for bit, not averaging's; the duals are per layer L-1 node; the anchors' bytes are the
    only downlink bytes averaging does not have, one float32 vector per node and device below each child per
    period."""
    N = len(tree)
    sections = dict(topology={"branching": tree}, tau=tau, participation={"fraction": fraction},
                    quantizer={"levels": [4] * N, "bucket": 16}, admm={"layer": layer, "rho": 0.5},
                    output={"checkpoint_every": 1})
    got, raw = run_here(tmp_path, "admm", **sections)
    assert np.array_equal(reference_for(load_config(raw)).run(4), got) and np.isfinite(got).all()
    avg, _ = run_here(tmp_path, "avg", **{**sections, "admm": {"layer": 0}})
    assert not np.array_equal(avg, got)
    with h5py.File(tmp_path / "admm.h5") as f, h5py.File(tmp_path / "avg.h5") as g:
        extra = f["metrics/downlink_bytes"][()].sum(axis=0) - g["metrics/downlink_bytes"][()].sum(axis=0)
        assert np.array_equal(f["metrics/uplink_bytes"][()], g["metrics/uplink_bytes"][()])
    cfg = load_config(raw)
    t = cfg.build_tree()
    d = got.size
    periods = 4 * math.prod(tau[layer:])  # the ADMM node's aggregations in 4 rounds (full participation above)
    kids = [math.ceil(fraction[layer - 1] * len(t.children(layer, 0)) - 0.5) if fraction[layer - 1] < 1
            else len(t.children(layer, 0))]
    below = [t.num_nodes(m - 1) // t.num_nodes(layer - 1) for m in range(1, layer)]  # per child, on link m
    nodes = t.num_nodes(layer)
    want = [4 * d * periods * nodes * kids[0] * below[m - 1] if m < layer else 0 for m in range(1, N + 1)]
    assert extra.tolist() == want, (extra.tolist(), want)


@pytest.mark.parametrize("sections, message", [
    ({"admm": {"layer": 3}}, r"'admm.layer' = 3: the tree has layers 1..2 \(1 = the edges"),
    ({"admm": {"layer": 2}, "system": {"down_rate": [1e6, 0]}},
     r"'admm.layer' = 2 with system.down_rate = \[1000000.0, 0.0\]: .* set system.down_rate to 0 on links 1..1"),
    ({"admm": {"layer": 2}, "aggregation": {"policy": ["all", "buffered"], "buffer": [0, 1]}},
     r"'admm.layer' = 2 with a buffered layer at or below 2"),
    ({"admm": {"layer": 1, "rho": 0}}, r"'admm.rho' = 0: ADMM's penalty must be > 0"),
    ({"admm": {"layer": 1}, "train": {"prox_mu": 0.1}}, r"with train.prox_mu = 0.1: .* set train.prox_mu: 0"),
    ({"admm": {"layer": 1}, "train": {"vectorize": "on"}}, r"with train.vectorize = on: .* one device at a time"),
    ({"admm": {"layer": 1}, "privacy": {"clip": 1.0, "placement": "local"}}, r"with privacy.clip = 1: the dual"),
    ({"admm": {"layer": 1}, "mobility": {"model": "random", "p": 0.5}}, r"with mobility/failures"),
])
def test_bad_admm_configs_are_refused_naming_the_key(tmp_path, sections, message):
    raw = copy.deepcopy(SMALL)
    for key, val in sections.items():
        raw[key] = {**raw.get(key, {}), **val} if isinstance(raw.get(key), dict) else val
    raw["output"] = {"path": str(tmp_path / "bad.h5")}
    with pytest.raises(ConfigError, match=message):
        load_config(raw)
