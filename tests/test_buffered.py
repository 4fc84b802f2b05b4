"""The buffered (semi-asynchronous) cloud (core/asynchrony.py, docs/algorithms.md "Buffered cloud"): the staleness
functions, the schedule's rules (ties, buffers, rounds, what is in flight), the synchronous run it reproduces, its
bytes, one clear error per bad input, and a SIGKILLed run resumed on another rank count.  Bit-identity with the
serial reference on 1-4 ranks: tests/mpi/test_engine_matrix.py."""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from helpers import REPO, SMALL, run_cli, small_config, wait_until_released
from qmlhfl_mpi import Session, load_config
from qmlhfl_mpi.config import ConfigError
from qmlhfl_mpi.core.asynchrony import Staleness
from qmlhfl_mpi.core.tiers import ARRIVE, FLUSH, START, Tier, TieredSchedule


def test_staleness_functions():
    assert Staleness("constant")(7) == 1.0
    assert Staleness("polynomial(0.5)")(3) == pytest.approx(0.5)
    hinge = Staleness("hinge(2, 1)")
    assert hinge(0) == hinge(1) == 1.0 and hinge(3) == pytest.approx(1 / 5)
    for bad in ("polynomial", "hinge(1)", "polynomial(-1)", "linear(1)", "polynomial(x)"):
        with pytest.raises(ValueError, match="expected one of constant, polynomial"):
            Staleness(bad)


def schedule(times, k, staleness="constant", sizes=None):
    """A schedule whose child ``c`` takes ``times[c]`` seconds a job (or ``times[c](j)``)."""
    def job(i, c, j, t0):
        d = times[c](j) if callable(times[c]) else times[c]
        return d, (c, j, t0)
    cloud = Tier(1, 0, list(range(len(times))), np.ones(len(times)) if sizes is None else np.asarray(sizes, float),
                 k, Staleness(staleness), leaf=True)
    return TieredSchedule([cloud], job)


def test_equal_times_and_a_full_buffer_are_synchronous_rounds():
    rounds = list(zip(range(3), schedule([1.0, 1.0, 1.0], 3).rounds()))
    for r, events in rounds:
        kinds = [e.kind for e in events]
        starts = [e for e in events if e.kind == START]
        assert kinds.count(FLUSH) == 1 and kinds.count(ARRIVE) == 3 and kinds[-1] == FLUSH
        assert [e.version for e in starts] == [r] * 3 and [e.job for e in starts] == [r] * 3  # from the newest
        flush = events[-1]
        assert flush.time == r + 1 and flush.round_end and [c for c, _ in flush.entries] == [0, 1, 2]
        assert all(w == np.float32(1 / 3) for _, w in flush.entries)  # staleness 0 everywhere


def test_a_fast_child_updates_more_often_and_stale_updates_weigh_less():
    sched = schedule([1.0, 3.0], 1, "polynomial(1)", sizes=[1, 3])
    assert sched.per_round == 2
    events = [e for _, e in zip(range(20), sched.events())]
    flushes = [e for e in events if e.kind == FLUSH]
    # t=1: child 0 (version 0 -> 1); t=2: child 0 again; t=3: child 0 (started at v2) and child 1 (v0), ids first
    assert [(e.time, e.entries[0][0]) for e in flushes[:5]] == [(1, 0), (2, 0), (3, 0), (3, 1), (4, 0)]
    assert flushes[3].entries[0][1] == np.float32(1 / 4)  # child 1's job started 3 versions ago: (1 + 3)^-1
    assert [e.round_end for e in flushes[:4]] == [False, True, False, True]
    t3 = [e for e in events if e.time == 3]  # every arrival at one instant before any restart
    assert [e.kind for e in t3] == [ARRIVE, FLUSH, ARRIVE, FLUSH, START, START]
    assert [e.version for e in t3 if e.kind == START] == [4, 4]


def test_what_is_in_flight_after_a_round():
    # jobs of 1, 2.5 and 4 s, updates every 2 arrivals, 2 updates a round: round 0 ends at t=3 (c0, c1 | c0),
    # round 1 at t=5 (c2, c0 | c0, c1); c0 and c1 restart at t=5 in round 2, so only c2 (restarted at 4) is busy
    done = [events for _, events in zip(range(2), schedule([1.0, 2.5, 4.0], 2).rounds())]
    assert [events[-1].time for events in done] == [3.0, 5.0]
    pending = schedule([1.0, 2.5, 4.0], 2).pending(done)
    assert pending.flying == {(0, 2)} and pending.buffers == {0: []}


def test_bad_buffers():
    with pytest.raises(ValueError, match=r"buffer k = 4 at layer 1 node 0: expected 1 <= k <= 3"):
        schedule([1.0] * 3, 4)
    with pytest.raises(ValueError, match="expected one cloud among the tiers, got 0"):
        TieredSchedule([Tier(1, 0, [0], np.ones(1), 1, Staleness("constant"), leaf=True, parent=0)],
                       lambda *a: (1.0, None))


BUFFERED = dict(topology={"branching": [3, 2, 2]}, tau=[2, 2, 1],
                quantizer={"levels": [3, 8, 8], "bucket": 16, "error_feedback": [False, True, False]})


def run_here(tmp_path, name, **sections):
    raw = copy.deepcopy(SMALL)
    raw.update(copy.deepcopy(BUFFERED))
    raw.update(sections)
    raw["train"] = {**raw["train"], "rounds": 3, "vectorize": "off"}
    raw["output"] = {"path": str(tmp_path / f"{name}.h5")}
    Session(load_config(raw), MPI.COMM_SELF).run()
    with h5py.File(tmp_path / f"{name}.h5") as f:
        return f["model/final"][()], {k: f["metrics"][k][()] for k in f["metrics"]}


def test_a_full_buffer_with_constant_staleness_and_speeds_is_the_synchronous_run(tmp_path):
    sync, m_sync = run_here(tmp_path, "sync")
    full, m_full = run_here(tmp_path, "full", aggregation={"policy": ["all", "all", "buffered"], "buffer": [0, 0, 3]})
    assert np.array_equal(sync, full)
    for key in ("messages", "uplink_bytes", "downlink_bytes", "virtual_time", "train_loss", "test_accuracy"):
        assert np.array_equal(m_sync[key], m_full[key], equal_nan=True), key
    one, m_one = run_here(tmp_path, "one", aggregation={"policy": ["all", "all", "buffered"], "buffer": [0, 0, 1],
                                                         "staleness": ["constant", "constant", "polynomial(0.5)"]})
    assert not np.array_equal(one, sync) and np.isfinite(one).all()
    # the same jobs (equal speeds), the same bytes: 3 updates a round instead of one
    assert np.array_equal(m_one["messages"], m_sync["messages"])
    assert np.array_equal(m_one["uplink_bytes"], m_one["messages"] * np.array([56, 76, 76]))


@pytest.mark.parametrize("policy, tau", [(["all", "buffered", "buffered"], [2, 2, 1]),
                                         (["buffered", "buffered", "buffered"], [2, 1, 2])])
def test_full_buffers_at_every_buffered_layer_are_the_synchronous_run(tmp_path, policy, tau):
    """Buffered layers below the cloud (regions, or every layer down to the edges) with full buffers,
    constant staleness and speeds: the synchronous model and messages, the keys of each job those of the
    synchronous run's work; the models go down hop by hop (each job's start, each adoption)."""
    sync, m_sync = run_here(tmp_path, "sync", tau=tau)
    buffer = [k if p == "buffered" else 0 for p, k in zip(policy, [2, 2, 3])]  # every node's children
    full, m_full = run_here(tmp_path, "tiers", tau=tau, aggregation={"policy": policy, "buffer": buffer})
    assert np.array_equal(sync, full)
    for key in ("messages", "uplink_bytes", "train_loss", "test_accuracy"):
        assert np.array_equal(m_sync[key], m_full[key], equal_nan=True), key
    np.testing.assert_allclose(m_full["virtual_time"], m_sync["virtual_time"], rtol=1e-12)
    # the models go down hop by hop: one float32 model per job started on the lowest buffered link, one per
    # adoption above it; after the first round (whose start has no adoption) as many as the messages up
    m = policy.index("buffered") + 1
    down = int(4 * full.size)
    assert (m_full["downlink_bytes"][1:, m - 1:] == m_full["messages"][1:, m - 1:] * down).all()
    assert (m_full["downlink_bytes"][0, m - 1] == m_full["messages"][0, m - 1] * down).all()


@pytest.mark.parametrize("sections, message", [
    ({"aggregation": {"policy": ["buffered", "all", "all"], "buffer": [2, 0, 0]}}, "must be a top segment m..N"),
    ({"aggregation": {"policy": ["all", "buffered", "all"], "buffer": [0, 2, 0]}}, r"here layers \[2\]; make layers 2..3"),
    ({"topology": {"tree": [[2, 2], [2]]}, "aggregation": {"policy": ["all", "buffered", "buffered"],
                                                            "buffer": [0, 2, 2]}},
     r"the smallest layer-2 node has 1 child\(ren\), fewer than its buffer k = 2"),
    ({"aggregation": {"policy": ["all", "all", "buffered"], "buffer": [0, 0, 4]}},
     r"layer-3 node needs 1 <= k <= 3 \(its children\); entry 3 is 4"),
    ({"aggregation": {"policy": ["all", "all", "buffered"]}}, "entry 3 is 0"),
    ({"aggregation": {"policy": ["all", "all", "buffered"], "buffer": [0, 0, 2], "staleness": ["constant"] * 2
                      + ["hinge(1)"]}}, r"aggregation.staleness\[2\]' = 'hinge\(1\)'"),
    ({"aggregation": {"policy": ["all", "all", "buffered"], "buffer": [0, 0, 2]},
      "participation": {"fraction": [1, 1, 0.5]}}, "keeps every child busy"),
    ({"aggregation": {"policy": ["all", "all", "buffered"], "buffer": [0, 0, 2]},
      "quantizer": {**BUFFERED["quantizer"], "downlink": [0, 0, 8]}}, "give 0 for link 3"),
    ({"aggregation": {"policy": ["all", "all", "buffered"], "buffer": [0, 0, 2]},
      "mobility": {"model": "random", "p": 0.5}}, "moves devices between synchronous rounds only"),
])
def test_bad_buffered_configs_are_refused_naming_the_key(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        load_config(small_config(tmp_path, **{**BUFFERED, **sections}))


@pytest.mark.portable
def test_the_example_sigkilled_mid_run_resumes_on_another_rank_count_bit_for_bit(tmp_path):
    """configs/examples/buffered.yaml on 2 ranks, rank 1 SIGKILLed when it starts an edge's job 4 (mid-round,
    after some checkpoint with jobs in flight: their messages are in it), resumed on 1 rank (in this process):
    the model and metrics of an uninterrupted run."""
    from fault_plugin import spec as fault

    example = str(REPO / "configs/examples/buffered.yaml")
    sets = ["train.rounds=6", "train.eval_every=3"]
    proc, _ = run_cli(2, ["run", example, "--quiet", *(x for s in sets for x in ("--set", s)), "--set",
                          f"output.path={tmp_path / 'killed.h5'}", "--set", fault("kill", rank=1, round=4)],
                      timeout=120, cwd=REPO)
    assert proc.returncode != 0, "the killed run ended normally"
    wait_until_released(tmp_path / "killed.h5.lock")  # (Open MPI returns while rank 0 is still being ended)
    with h5py.File(tmp_path / "killed.h5.ckpt") as f:
        done, names = int(f.attrs["rounds_done"]), sorted(f["state"])
    assert 1 <= done < 6 and any(n.startswith("held.2.") for n in names), (done, names)
    Session(load_config(example, [*sets, f"output.path={tmp_path / 'killed.h5'}"]), MPI.COMM_SELF).run(resume=True)
    Session(load_config(example, [*sets, f"output.path={tmp_path / 'whole.h5'}"]), MPI.COMM_SELF).run()
    with h5py.File(tmp_path / "killed.h5") as a, h5py.File(tmp_path / "whole.h5") as b:
        assert a.attrs["resumed_at_rounds"].tolist() == [done] and a.attrs["world_size"] == 1
        assert np.array_equal(a["model/final"][()], b["model/final"][()])
        for key in ("messages", "uplink_bytes", "downlink_bytes", "virtual_time", "train_loss", "test_accuracy"):
            assert np.array_equal(a["metrics"][key][()], b["metrics"][key][()], equal_nan=True), key
        m = b["metrics"]
        assert (m["uplink_bytes"][()] == m["messages"][()] * b["quantizer/message_bytes"][()]).all()
        assert (m["messages"][()][:, 1] == 3 * 2).all()  # 3 updates of 2 arrivals a round


def test_plan_prints_a_buffered_rounds_events(capsys):
    """``qmlhfl-mpi plan`` of a buffered config lists the round's events: starts, arrivals, updates with their
    staleness-discounted weights (nothing trained)."""
    from qmlhfl_mpi.cli import main

    assert main(["plan", str(REPO / "configs/examples/buffered.yaml"), "--round", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("round 2 of buffered layers 2..2 (k_2 = 2)")
    updates = [ln for ln in lines if " update " in ln]
    assert len(updates) == 3 and updates[-1].endswith("(ends the round)")  # ceil(6 / 2) updates a round
    assert any(" start " in ln for ln in lines) and any(" arrive " in ln for ln in lines)
