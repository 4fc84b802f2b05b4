"""Client-level differential privacy (core/privacy.py, docs/privacy.md): the accountant against a published value
and its own rules, the codecs' norm factors, every placement against the serial reference, the budget stop and
its resumption, one clear error per bad input.  On 1-4 ranks: tests/mpi/test_engine_matrix.py."""
from __future__ import annotations

import copy
import math

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from helpers import REPO, SMALL, run_cli
from qmlhfl_mpi import Session, load_config
from qmlhfl_mpi.config import ConfigError
from qmlhfl_mpi.core.codecs import make_codec
from qmlhfl_mpi.core.participation import Participation
from qmlhfl_mpi.core.plan import Planner
from qmlhfl_mpi.core.privacy import Accountant, Mechanism, clip_scale, largest_device_weight
from qmlhfl_mpi.core.topology import Tree
from qmlhfl_mpi.run.errors import RunError
from reference import reference_for


def test_the_accountant_reproduces_abadi_et_al():
    """Abadi et al., "Deep Learning with Differential Privacy" (CCS 2016), section 3.1: q = 0.01, sigma = 4,
    delta = 1e-5, T = 10000 steps gives epsilon ~ 1.26 with the moments accountant (integer orders up to 32,
    epsilon = min (RDP(a) + log(1/delta) / (a - 1))).  The library's own conversion is tighter."""
    import dp_accounting as dpa
    from dp_accounting import rdp

    orders = np.arange(2, 33, dtype=float)
    acc = rdp.RdpAccountant(orders)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(4.0)), 10000))
    moments = float(np.min(acc.rdp + math.log(1 / 1e-5) / (orders - 1)))
    assert round(moments, 2) == 1.26
    assert acc.get_epsilon(1e-5) < moments


def test_the_accountants_rules():
    """Without sampling a round is ``releases`` Gaussian mechanisms of multiplier sigma / 2 (replace-one): RDP
    ``T r a / (2 (sigma / 2)^2)``, converted as the library does; sampling without replacement lowers epsilon,
    local noise is never amplified, epsilon grows with the rounds and the budget is the last round within it."""
    from dp_accounting import rdp

    full = Accountant.of(2.0, 1, [2, 3, 1], [(4, 4)], 1e-5)
    assert full.releases == 3  # an edge's noised sums per round: prod(tau_2..tau_3)
    orders = np.array(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=float)
    closed = 5 * 3 * orders / (2 * (2.0 / 2) ** 2)
    assert full.epsilon(5) == pytest.approx(float(rdp.rdp_privacy_accountant.compute_epsilon(orders, closed,
                                                                                              1e-5)[0]))
    sampled = Accountant.of(2.0, 1, [2, 3, 1], [(4, 2), (8, 4)], 1e-5)
    assert sampled.epsilon(5) < full.epsilon(5)
    assert sampled.epsilon(5) == max(Accountant.of(2.0, 1, [2, 3, 1], [e], 1e-5).epsilon(5) for e in sampled.edges)
    local = Accountant.of(2.0, 0, [2, 3, 1], [(4, 2)], 1e-5)
    assert local.releases == 3 and local.edges == ((1, 1),) and local.epsilon(5) == full.epsilon(5)
    eps = [sampled.epsilon(t) for t in range(0, 8)]
    assert eps[0] == 0 and all(a < b for a, b in zip(eps, eps[1:]))
    k = sampled.rounds_within(eps[4] + 1e-9, 50)
    assert k == 4 and sampled.rounds_within(1e9, 50) == 50
    assert Accountant.of(0.0, 1, [2, 1], [(4, 4)], 1e-5).epsilon(1) == math.inf


def test_clipping_the_noise_and_the_largest_device_weight():
    assert clip_scale(0.5, 1.0) == 1 and clip_scale(4.0, 1.0) == np.float32(0.25)
    mech = Mechanism(clip=2.0, sigma=0.5, layer=2, kappa=1.5, seed=3)
    a, b = mech.noise(1000, (2, 0, 1, 0), 3.0), mech.noise(1000, (2, 0, 1, 0), 3.0)
    assert a.dtype == np.float32 and np.array_equal(a, b) and 2.7 < a.std() < 3.3
    assert not np.array_equal(a, mech.noise(1000, (2, 0, 1, 1), 3.0))  # keyed by the call
    assert mech.node_std(0.25, mech.clip) == 0.5 * 2.0 * 1.5 * 0.25
    # a cloud over 2 edges of 3 and 1 devices, weighted by devices: the lone device weighs 1/4 at the cloud
    planner = Planner(Tree.from_nested([3, 1]), [1, 1], Participation((1.0, 1.0), (1.0, 1.0)), 0)
    plan = planner.plan(0)
    assert largest_device_weight(plan, 0) == pytest.approx(max(3 / 4 * 1 / 3, 1 / 4))
    assert largest_device_weight(plan, 1) == pytest.approx(1 / 3)


@pytest.mark.parametrize("kind, levels, bucket", [("qsgd", 2, 16), ("qsgd", 8, 0), ("round", 3, 8), ("topk", 8, 16),
                                                  ("sign", 1, 16), ("none", 0, 16), ("qsgd", 4, "tensor")])
def test_the_codecs_norm_factor_bounds_every_decoded_message(kind, levels, bucket):
    rng = np.random.default_rng(0)
    d = 60
    codec = make_codec(levels, bucket, kind, tensor_sizes=(20, 40), fraction=0.1)
    kappa = codec.norm_factor(d)
    assert kappa is not None and kappa >= 1
    worst = 0.0
    for i in range(200):
        x = rng.standard_normal(d).astype(np.float32) * (rng.random(d) < 0.2 if i % 2 else 1)
        x = x.astype(np.float32)
        if not np.linalg.norm(x):
            continue
        y = codec.decode(codec.encode(x, np.zeros(d, np.float32), (1, 4, 1, i, 0, 0)), d)
        worst = max(worst, float(np.linalg.norm(y) / np.linalg.norm(x)))
    assert worst <= kappa * (1 + 1e-6), (worst, kappa)


def raw(tmp_path, name, **sections):
    r = copy.deepcopy(SMALL)
    r["train"] = {**r["train"], "rounds": 4, "vectorize": "off"}
    r.update(copy.deepcopy(sections))
    r["output"] = {"path": str(tmp_path / f"{name}.h5")}
    return r


def read(path):
    with h5py.File(path) as f:
        return f["model/final"][()], {k: f["metrics"][k][()] for k in f["metrics"]}, f.attrs["status"]


PLACEMENTS = {
    # local noise: error feedback and any codec are post-processing; two local runs per round
    "local": dict(topology={"branching": [3, 3]}, tau=[2, 2], participation={"fraction": [0.67, 1]},
                  quantizer={"levels": [3, 8], "bucket": 16, "error_feedback": [False, True]},
                  privacy={"clip": 0.3, "noise_multiplier": 0.7, "placement": "local", "clip_quantile": 0.5}),
    # noise at the edges of a 3-layer tree: momentum at the regions (above the noise) is post-processing; the
    # clip adapts (each edge noises its count)
    "edge": dict(topology={"branching": [2, 2, 3]}, tau=[2, 1, 2], participation={"fraction": [0.67, 1, 1]},
                 quantizer={"levels": [3, 8, 8], "bucket": 16}, server={"optimizer": ["avg", "momentum", "avg"]},
                 privacy={"clip": 0.3, "noise_multiplier": 0.7, "placement": "edge", "layer": 1,
                          "clip_quantile": 0.7, "clip_lr": 0.5, "clip_count_noise": 2.0}),
    # noise at the cloud: float32 above the devices' link, unbiased weights (omega above 1 / devices)
    "central": dict(topology={"branching": [2, 2, 3]}, tau=[2, 1, 1],
                    participation={"fraction": [0.67, 1, 1], "weighting": "unbiased"},
                    quantizer={"levels": [3, 0, 0], "bucket": 16},
                    privacy={"clip": 0.3, "noise_multiplier": 0.7, "placement": "central"}),
}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_every_placement_equals_the_serial_reference(tmp_path, placement):
    r = raw(tmp_path, placement, **PLACEMENTS[placement])
    Session(load_config(r), MPI.COMM_SELF).run()
    model, metrics, _ = read(tmp_path / f"{placement}.h5")
    ref = reference_for(load_config(r))
    assert np.array_equal(model, ref.run(4))
    no_noise = {**PLACEMENTS[placement], "privacy": {**PLACEMENTS[placement]["privacy"], "noise_multiplier": 0}}
    r0 = raw(tmp_path, "clip-only", **no_noise)
    Session(load_config(r0), MPI.COMM_SELF).run()
    clipped, m0, _ = read(tmp_path / "clip-only.h5")
    assert not np.array_equal(model, clipped) and np.isinf(m0["epsilon"]).all()
    eps = metrics["epsilon"]
    assert np.isfinite(eps).all() and (np.diff(eps) > 0).all()


def test_an_adaptive_clip_moves_toward_the_quantile_from_either_side(tmp_path):
    """Andrew et al.'s geometric update: a clip 100 times too small grows and one 100 times too large shrinks,
    each by exp(clip_lr q) or exp(-clip_lr (1 - q)) while every update is clipped or none is, and both end near
    each other (the median update norm); every round records the clip it used and its noised fraction; a fixed
    clip records its clip and no fraction (it is not released)."""
    base = dict(topology={"branching": [2, 3]}, tau=[2, 1], quantizer={"levels": [0, 0]},
                privacy={"noise_multiplier": 0.5, "placement": "central", "clip_quantile": 0.5, "clip_lr": 1.0})
    clips = {}
    for start in (1e-3, 10.0):
        r = raw(tmp_path, f"c{start}", **{**base, "privacy": {**base["privacy"], "clip": start}})
        r["train"]["rounds"] = 14
        Session(load_config(r), MPI.COMM_SELF).run()
        _, m, _ = read(tmp_path / f"c{start}.h5")
        clip, frac = m["clip"], m["unclipped_fraction"]
        assert clip[0] == start and np.isfinite(frac).all()
        assert np.allclose(clip[1:], clip[:-1] * np.exp(-(frac[:-1] - 0.5)), rtol=1e-12)
        first = 0 if start < 1 else 1  # all clipped (about 0 within) or none (about 1): a full step
        assert abs(frac[0] - first) < 0.6 and (clip[1] > clip[0]) == (start < 1)
        clips[start] = clip
    assert 0.2 < clips[1e-3][-1] / clips[10.0][-1] < 5, (clips[1e-3][-1], clips[10.0][-1])
    fixed = raw(tmp_path, "fixed", **{**base, "privacy": {"clip": 0.1, "noise_multiplier": 0.5}})
    Session(load_config(fixed), MPI.COMM_SELF).run()
    _, m, _ = read(tmp_path / "fixed.h5")
    assert (m["clip"] == 0.1).all() and np.isnan(m["unclipped_fraction"]).all()
    mech = Mechanism(1.0, 2.0, 2, 1.0, 0, quantile=0.5, clip_lr=0.2, count_std=3.0)
    assert mech.update_sigma == pytest.approx((2.0 ** -2 - 6.0 ** -2) ** -0.5)
    assert mech.next_clip(1.0, 3, 4, 0.0) == (pytest.approx(math.exp(-0.2 * 0.25)), 0.75)


@pytest.mark.portable
def test_the_example_stopped_at_its_budget_on_2_ranks_resumes_on_1_to_the_uninterrupted_run(tmp_path):
    """configs/examples/dp_central.yaml under mpiexec -n 2 stops before a round would spend more than its target
    epsilon (exit 0, the final model written, the checkpoint kept); a larger target continues it on 1 rank to
    the model and metrics of a run without a target."""
    example = str(REPO / "configs/examples/dp_central.yaml")
    sets = ["train.rounds=5", "privacy.target_epsilon=8"]
    proc, _ = run_cli(2, ["run", example, "--quiet", *(x for s in sets for x in ("--set", s)), "--set",
                          f"output.path={tmp_path / 'budget.h5'}"], timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped at the privacy budget after 3 rounds: epsilon = 7.59" in proc.stderr
    stopped, m3, status = read(tmp_path / "budget.h5")
    assert status == "budget_spent" and (tmp_path / "budget.h5.ckpt").exists() and len(m3["epsilon"]) == 3
    more = load_config(example, ["train.rounds=5", "privacy.target_epsilon=100", f"output.path={tmp_path / 'budget.h5'}"])
    Session(more, MPI.COMM_SELF).run(resume=True)
    Session(load_config(example, ["train.rounds=5", "privacy.target_epsilon=0",
                                  f"output.path={tmp_path / 'whole.h5'}"]), MPI.COMM_SELF).run()
    resumed, m5, status = read(tmp_path / "budget.h5")
    model, metrics, _ = read(tmp_path / "whole.h5")
    assert status == "completed" and np.array_equal(resumed, model)
    assert m5["epsilon"][:3].tolist() == m3["epsilon"].tolist()
    for key in ("epsilon", "uplink_bytes", "train_loss", "test_accuracy", "virtual_time"):
        assert np.array_equal(m5[key], metrics[key], equal_nan=True), key


@pytest.mark.parametrize("sections, message", [
    ({"privacy": {"noise_multiplier": 1.0}}, r"'privacy.clip' = 0: privacy.noise_multiplier and"),
    ({"privacy": {"clip": 1.0, "target_epsilon": 3}}, "without noise"),
    ({"privacy": {"clip": 1.0, "placement": "edge", "layer": 2}}, r"'privacy.layer' = 2: .* 1..1"),
    ({"tau": [2, 2], "privacy": {"clip": 1.0, "placement": "central"}}, r"tau_2..tau_2 must be 1"),
    ({"tau": [2, 1], "quantizer": {"levels": [3, 0], "error_feedback": [True, False]},
      "privacy": {"clip": 1.0, "placement": "central"}}, r"switch it off on links 1..2 \(link 1 has it\)"),
    ({"tau": [2, 1], "server": {"optimizer": ["momentum", "avg"]}, "privacy": {"clip": 1.0}},
     r"use avg on layers 1..1 \(layer 1\)"),
    ({"aggregation": {"policy": ["all", "buffered"], "buffer": [0, 2]}, "privacy": {"clip": 1.0, "placement": "local"}},
     "accounts synchronous rounds only"),
    ({"mobility": {"model": "random", "p": 0.5}, "privacy": {"clip": 1.0, "placement": "local"}}, "a fixed tree"),
    ({"privacy": {"clip": 1.0, "noise_multiplier": 2.0, "placement": "local", "clip_quantile": 0.5,
                  "clip_count_noise": 0.9}}, r"'privacy.clip_count_noise' = 0.9: .* exceed .* = 1"),
    ({"privacy": {"clip": 1.0, "placement": "local", "clip_quantile": 0.5, "clip_lr": 0}}, r"'privacy.clip_lr' = 0"),
    ({"quantizer": {"levels": [16, 8], "kind": ["intsum", "qsgd"]},
      "privacy": {"clip": 1.0, "placement": "local", "clip_quantile": 0.5}}, r"intsum's scale is fixed"),
])
def test_bad_privacy_configs_are_refused_naming_the_key(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw(tmp_path, "bad", **sections))


@pytest.mark.parametrize("sections, message", [
    ({"tau": [2, 1], "privacy": {"clip": 1.0, "placement": "central"}},
     r"link 2 \(qsgd\(s=8, bucket=16\)\) lies between the devices and the noise at layer 2"),
    ({"tau": [2, 1], "quantizer": {"levels": [3, 0], "bucket": 16},
      "privacy": {"clip": 1.0, "noise_multiplier": 0.5, "target_epsilon": 1.0}},
     r"'privacy.target_epsilon' = 1 is unreachable: one round already spends epsilon = \d"),
])
def test_what_only_the_built_run_knows_is_refused_before_training(tmp_path, sections, message):
    with pytest.raises(RunError, match=message) as e:
        Session(load_config(raw(tmp_path, "bad", **sections)), MPI.COMM_SELF)
    assert e.value.code == 2 and not (tmp_path / "bad.h5").exists()
