"""Secure aggregation (core/secagg.py, core/codecs/intsum.py, comm/summing.py; docs/privacy.md): the masks cancel
and a masked message is uniform, dropped members' masks are removed exactly, the integer codes add up to the
weighted sum, masks change nothing but what the parent sees (bit for bit, bytes of the protocol counted), the
serial reference, one clear error per bad input.  On 1-4 ranks: tests/mpi/test_engine_matrix.py."""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from helpers import SMALL
from qmlhfl_mpi import Session, load_config
from qmlhfl_mpi.config import ConfigError
from qmlhfl_mpi.core.codecs.intsum import IntSumCodec, fwht
from qmlhfl_mpi.core.secagg import KEY_BYTES, Group, recovery_bytes
from reference import reference_for

B = 16
MOD = np.uint64(1 << B)


def codes_of(members, d, seed=0):
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 1 << B, d).astype(np.uint64) for c in members}


def test_the_masks_cancel_in_the_sum_and_dropped_members_are_recovered():
    members = [2, 3, 5, 8, 13]
    group = Group(members, (7, 1, 4, 0, 1), 512, B)
    codes = codes_of(members, 512)
    masked = {c: group.masked(c, codes[c]) for c in members}
    plain = sum(codes.values()) % MOD
    assert np.array_equal(sum(masked.values()) % MOD, plain)
    assert not any(np.array_equal(masked[c], codes[c]) for c in members)
    # the keys are real X25519: both sides of a pair agree, and another aggregation has other keys
    assert np.array_equal(group.pair_mask(3, 8), group.pair_mask(8, 3)) and len(group.public(3)) == KEY_BYTES
    assert group.public(3) != Group(members, (7, 1, 4, 0, 2), 512, B).public(3)
    for kept in ([2, 5, 13], [8], [2, 3, 5, 8]):  # dropped in the middle of the group, at its ends, all but one
        total = sum(masked[c] for c in kept) % MOD
        assert not np.array_equal(total, sum(codes[c] for c in kept) % MOD)
        assert np.array_equal(group.unmask_dropped(total, kept), sum(codes[c] for c in kept) % MOD)
    assert recovery_bytes(5, 3) == (32 * 5 + 32 * 3 * 2, 32 * 5 * 4) and recovery_bytes(4, 4)[0] == 32 * 4


def test_a_single_masked_message_is_uniform():
    """Chi-square over 64 bins of one member's masked message (20000 values mod 2^16) whose codes are all zero:
    p > 0.001 (the statistic below the 0.999 quantile of chi-square with 63 degrees of freedom, 103.4)."""
    members = [0, 1, 2]
    group = Group(members, (1, 1, 0, 0, 0), 20000, B)
    masked = group.masked(1, np.zeros(20000, dtype=np.uint64))
    counts = np.bincount((masked >> np.uint64(B - 6)).astype(np.int64), minlength=64)
    expected = 20000 / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 103.4, chi2


def test_the_codes_add_up_to_the_weighted_sum_rotated_or_not():
    rng = np.random.default_rng(1)
    d = 100
    u = [rng.standard_normal(d).astype(np.float32) * 0.1 for _ in range(4)]
    u[0][3] = 0.5  # one large coordinate: the rotation spreads it
    a = [0.1, 0.2, 0.3, 0.4]
    want = sum(np.float64(w) * x.astype(np.float64) for w, x in zip(a, u))
    for rotate in (False, True):
        codec = IntSumCodec(B, 2000.0, rotate)
        total = sum(codec.codes(x, w, (1, 4, 1, i, 0, 0), (1, 14, 1, 0, 0, 0)) for i, (x, w) in enumerate(zip(u, a)))
        got = codec.decode_sum(total % MOD, d, (1, 14, 1, 0, 0, 0))
        assert got.dtype == np.float32 and got.shape == (d,)
        assert np.abs(got - want).max() <= 4 / 2000.0 + 1e-6  # each child rounds by less than one code
        n = codec.length(d)
        assert n == (128 if rotate else 100) and codec.nbytes(d) == n * B // 8
        assert np.array_equal(codec.unpack(codec.pack(total % MOD), d), total % MOD)
    x = rng.standard_normal(64)
    assert np.allclose(fwht(fwht(x)), x) and np.isclose(np.linalg.norm(fwht(x)), np.linalg.norm(x))
    wide = IntSumCodec(24, 1.0)
    codes = np.array([0, 1, (1 << 24) - 1], dtype=np.uint64)
    assert wide.nbytes(3) == 12 and np.array_equal(wide.unpack(wide.pack(codes), 3), codes)


SECURE = dict(topology={"branching": [2, 4]}, tau=[2, 2], participation={"fraction": [0.75, 1]},
              quantizer={"levels": [16, 8], "bucket": 16, "kind": ["intsum", "qsgd"], "rotate": [True, False]},
              system={"speed": "lognormal(1)"}, aggregation={"policy": ["deadline", "all"], "deadline": [0.03, 0]},
              privacy={"clip": 0.5, "noise_multiplier": 0.8, "placement": "local"})


def run_here(tmp_path, name, **sections):
    raw = copy.deepcopy(SMALL)
    raw.update(copy.deepcopy(sections))
    raw["train"] = {**raw["train"], "rounds": 3, "vectorize": "off"}
    raw["output"] = {"path": str(tmp_path / f"{name}.h5")}
    Session(load_config(raw), MPI.COMM_SELF).run()
    with h5py.File(tmp_path / f"{name}.h5") as f:
        return f["model/final"][()], {k: f["metrics"][k][()] for k in f["metrics"]}, raw


def test_masks_change_nothing_but_what_the_parent_sees(tmp_path):
    """Local DP noise, intsum codes rotated, edges that sample 3 of 4 devices and drop stragglers at a deadline
    (dropouts inside key groups): the same model with secure aggregation on and off, bit for bit, equal to the
    serial reference; the protocol's bytes per aggregation: keys up and down, one seed per survivor and dropped
    member."""
    off, m_off, raw = run_here(tmp_path, "off", **SECURE)
    on, m_on, _ = run_here(tmp_path, "on", **{**SECURE, "privacy": {**SECURE["privacy"],
                                                                     "secure_aggregation": [True, False]}})
    assert np.array_equal(on, off) and np.isfinite(on).all()
    assert np.array_equal(reference_for(load_config(raw)).run(3), off)
    for key in ("uplink_bytes", "messages", "downlink_bytes", "train_loss", "epsilon"):
        assert np.array_equal(m_on[key], m_off[key], equal_nan=True), key
    assert (m_off["secagg_bytes"] == 0).all() and (m_on["secagg_bytes"][:, 1] == 0).all()
    # 4 aggregations a round (2 edges, tau_2 = 2), groups of 3; the survivors are those not dropped
    kept = 4 * 3 - m_on["dropped"][:, 0]
    assert (m_on["dropped"][:, 0] > 0).all()
    up_keys, down_keys = 4 * 3 * 32, 4 * 3 * 2 * 32
    assert (m_on["secagg_bytes"][:, 0] >= up_keys + down_keys).all()
    assert (m_on["secagg_bytes"][:, 0] <= up_keys + down_keys + 32 * kept * 2).all()
    assert (m_on["uplink_bytes"][:, 0] == m_on["messages"][:, 0] * 128 * 16 // 8).all()  # d' = 128 codes of 16 bits


def test_a_group_with_too_few_survivors_aborts(tmp_path):
    """privacy.secure_threshold 2: an aggregation whose key group keeps one survivor takes nobody (the lone
    update stays hidden), its keys still counted; the serial reference aborts the same groups."""
    sections = {**SECURE, "privacy": {**SECURE["privacy"], "secure_aggregation": [True, False]}}
    lone, m1, _ = run_here(tmp_path, "lone", **sections)
    strict, m2, raw = run_here(tmp_path, "strict", **{**sections, "privacy": {**sections["privacy"],
                                                                             "secure_threshold": 2}})
    assert not np.array_equal(strict, lone) and np.array_equal(reference_for(load_config(raw)).run(3), strict)
    aborted = m2["dropped"][:, 0] - m1["dropped"][:, 0]  # survivors whose group aborted count as dropped
    assert (aborted > 0).all() and (m2["messages"] == m1["messages"]).all()
    assert (m2["secagg_bytes"][:, 0] < m1["secagg_bytes"][:, 0]).all()  # no seeds revealed for an aborted group
    assert (m2["secagg_bytes"][:, 0] >= 4 * (3 * 32 + 3 * 2 * 32)).all()  # every group's keys


@pytest.mark.parametrize("sections, message", [
    ({"quantizer": {"levels": [16, 8], "kind": ["intsum", "qsgd"]}}, r"intsum on link 1 needs privacy.clip > 0"),
    ({"quantizer": {"levels": [16, 8], "kind": ["intsum", "qsgd"]},
      "privacy": {"clip": 1.0, "placement": "local", "secure_aggregation": [True, False], "secure_threshold": 4}},
     r"'privacy.secure_threshold' = 4: the smallest key group has 3 members"),
    ({"quantizer": {"levels": [3, 16], "kind": ["qsgd", "intsum"]}, "privacy": {"clip": 1.0, "placement": "local"}},
     r"intsum on link 2; this version"),
    ({"quantizer": {"levels": [4, 8], "kind": ["intsum", "qsgd"], "scale": [100.0, 0]},
      "privacy": {"clip": 1.0, "placement": "local"}},
     r"a modulus of 2\^4 is too small for a group's sum: with 3 children, clip C = 1, weights adding up to 1 and "
     r"scale gamma = 100, codes may reach gamma C A \+ m = 103 > 2\^3 - 1 = 7"),
    ({"quantizer": {"levels": [3, 8], "kind": ["intsum", "qsgd"]}, "privacy": {"clip": 1.0, "placement": "local"}},
     r"a modulus of 2\^3 is too small"),
    ({"topology": {"tree": [3, 1]}, "quantizer": {"levels": [16, 8], "kind": ["intsum", "qsgd"]},
      "privacy": {"clip": 1.0, "placement": "local", "secure_aggregation": [True, False]}},
     r"an edge aggregates 1 child in some aggregation, and a group of one reveals"),
    ({"privacy": {"clip": 1.0, "placement": "local", "secure_aggregation": [True, False]}},
     r"layer 1 needs its children to send intsum codes"),
    ({"quantizer": {"levels": [16, 8], "kind": ["intsum", "qsgd"], "error_feedback": [True, False]},
      "privacy": {"clip": 1.0, "placement": "local"}}, r"error_feedback' with intsum on link 1"),
])
def test_bad_secure_aggregation_configs_are_refused_naming_the_key(tmp_path, sections, message):
    raw = copy.deepcopy(SMALL)
    raw["topology"] = {"branching": [2, 3]}
    raw.update(copy.deepcopy(sections))
    raw["output"] = {"path": str(tmp_path / "bad.h5")}
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_central_noise_over_intsum_codes_is_refused_before_training(tmp_path):
    from qmlhfl_mpi.run.errors import RunError
    raw = copy.deepcopy(SMALL)
    raw.update(tau=[2, 1], quantizer={"levels": [16, 0], "kind": ["intsum", "qsgd"]},
               privacy={"clip": 1.0, "noise_multiplier": 1.0, "placement": "central"},
               output={"path": str(tmp_path / "bad.h5")})
    with pytest.raises(RunError, match=r"link 1's codec intsum\(b=16.*has no known norm bound"):
        Session(load_config(raw), MPI.COMM_SELF)


def test_the_example_gives_the_same_model_with_the_masks_off(tmp_path):
    """configs/examples/secagg.yaml (32 devices, key groups of 6, stragglers dropped) for 2 rounds: distributed DP
    as given (noise shares in the codes, keys counted, a finite epsilon); with each device's own Gaussian noise
    instead (placement local), with and without masks: the same model, the protocol's bytes counted only with
    them."""
    from helpers import REPO

    example = str(REPO / "configs/examples/secagg.yaml")
    out = {}
    for name, sets in (("distributed", []), ("true", ["privacy.placement=local"]),
                       ("false", ["privacy.placement=local", "privacy.secure_aggregation=[false, false]"])):
        cfg = load_config(example, ["train.rounds=2", f"output.path={tmp_path / name}.h5", *sets])
        Session(cfg, MPI.COMM_SELF).run()
        with h5py.File(tmp_path / f"{name}.h5") as f:
            out[name] = (f["model/final"][()], f["metrics/secagg_bytes"][()], f["metrics/dropped"][()],
                         f["metrics/epsilon"][()])
    assert np.array_equal(out["true"][0], out["false"][0])
    assert (out["true"][1][:, 0] > 0).all() and (out["false"][1] == 0).all() and (out["true"][2][:, 0] > 0).all()
    ddg = out["distributed"]
    assert (ddg[1][:, 0] > 0).all() and np.isfinite(ddg[0]).all() and not np.array_equal(ddg[0], out["true"][0])
    assert 0 < ddg[3][0] < ddg[3][1] < np.inf
