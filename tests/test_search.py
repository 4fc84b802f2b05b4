"""`optimize --search halving` (analysis/search.py), the validation split it scores on (data.validation) and the
kept checkpoint its survivors continue from (output.keep_checkpoint)."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from arrow_plugin import arrays
from helpers import SMALL, small_config
from qmlhfl_mpi import load_config
from qmlhfl_mpi.analysis.clockfit import ClockModel
from qmlhfl_mpi.analysis.search import power_values, space_filling, successive_halving
from qmlhfl_mpi.cli import main
from qmlhfl_mpi.config import build as builders
from qmlhfl_mpi.run.errors import RunError
from qmlhfl_mpi.run.session import Session

# ---- the search's parts, pure ------------------------------------------------------------------------------


def test_power_values():
    assert power_values(1) == (1,) and power_values(8) == (1, 2, 4, 8) and power_values(12) == (1, 2, 4, 8, 12)
    with pytest.raises(ValueError, match="max_tau=0"):
        power_values(0)


def test_space_filling_starts_from_the_given_members_and_is_maximin_greedy():
    grid = list(itertools.product((1, 2, 4, 8), repeat=2))
    picks = space_filling(grid, 5, first=[(2, 2), (3, 3), (8, 1)])  # (3, 3) is not in the grid: skipped
    assert picks[:2] == [(2, 2), (8, 1)] and len(set(picks)) == 5 and set(picks) <= set(grid)
    pts = {t: np.log2(t) for t in grid}
    for i in range(2, 5):  # each pick is a farthest member from those before it (brute force)
        d = {t: min(np.linalg.norm(pts[t] - pts[c]) for c in picks[:i]) for t in grid}
        assert d[picks[i]] == pytest.approx(max(d.values()))
    assert space_filling(grid[:3], 5) == grid[:3]


def test_successive_halving_keeps_the_best_third_continues_runs_and_picks_the_best_at_the_deadline():
    best_late = (4, 2)  # scores: the rung-1 leader (2, 1) falls behind (4, 2) once the runs are long
    calls: list[tuple[tuple[int, ...], int]] = []

    def rounds_within(tau, seconds):
        return int(seconds / (0.1 * math.prod(tau) + 0.05))

    def train(tau, rounds):
        before = max((r for t, r in calls if t == tau), default=0)
        assert before < rounds, "a run trained rounds it had already"
        calls.append((tau, rounds))
        steps = rounds * math.prod(tau)
        bias = 0.0 if tau == best_late else 0.02 * math.log2(math.prod(tau) + 1)
        early = tau == (2, 1) and rounds < 20  # leads at 20% of the deadline only
        score = 0.0 if early else 1.0 / (1 + steps) + bias + (0.5 if tau in ((8, 8), (2, 1)) else 0.0)
        return score, 0.01 * (rounds - before) * math.prod(tau)

    cands = [(1, 1), (2, 2), (4, 2), (8, 8), (1, 4), (2, 1)]
    res = successive_halving(cands, 10.0, rounds_within, train, eta=3)
    # (8, 8) ends no round within 20% or 50% of the deadline: it is not judged there and goes on, untrained
    assert [len(res.rung(r)) for r in range(3)] == [6, 3, 3]  # ceil(5/3) = 2 judged and (8, 8); at least 2 + 1
    assert [t.rounds for t in res.trials if t.tau == (8, 8)] == [0, 0, 1] and res.rung(0)[-1].tau == (8, 8)
    assert math.isnan(res.rung(0)[-1].score) and res.rung(2)[-1].tau == (8, 8)  # judged at the deadline: worst
    assert res.chosen == min(res.rung(2), key=lambda t: t.score).tau
    assert all(t.rounds == rounds_within(t.tau, t.budget) for t in res.trials)
    assert set(t.tau for t in res.rung(1)) == set(t.tau for t in res.rung(0)[:2]) | {(8, 8)}
    assert res.chosen == best_late and res.rung(0)[0].tau == (2, 1)  # the long run decided
    assert res.cost == pytest.approx(0.01 * sum(max(r for t, r in calls if t == c) * math.prod(c) for c in cands))
    chosen_steps = max(r for t, r in calls if t == res.chosen) * math.prod(res.chosen)
    assert res.full_run_cost == pytest.approx(0.01 * chosen_steps)  # continued runs: one full run
    rec = json.loads(res.to_json())
    assert rec["chosen"] == list(res.chosen) and len(rec["trials"]) == 12 and rec["cost_core_seconds"] > 0
    assert [t["score"] for t in rec["trials"] if t["tau"] == [8, 8]][:2] == [None, None]
    with pytest.raises(ValueError, match="no candidates"):
        successive_halving([], 10.0, rounds_within, train)
    with pytest.raises(ValueError, match="fractions"):
        successive_halving(cands, 10.0, rounds_within, train, fractions=(0.5, 0.2, 1.0))


# ---- the command, on a tiny synthetic problem with the clock -----------------------------------------------


def test_optimize_search_returns_a_feasible_tau_and_records_search_pilots_and_cost(tmp_path, capsys):
    cfg_path = small_config(tmp_path, latency={"step_time": 0.01, "uplink_rate": [1e6, 1e6],
                                               "uplink_latency": [0.01, 0.1]}, system={"speed": "lognormal(1)"})
    out = tmp_path / "chosen.yaml"
    deadline = 3.0
    rc = main(["optimize", str(cfg_path), "--search", "halving", "--deadline", str(deadline), "--max-tau", "4",
               "--candidates", "6", "--write", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    written = out.read_text()
    rec = json.loads(next(ln for ln in written.splitlines() if ln.startswith("# search-json: ")).split(": ", 1)[1])
    new = load_config(str(out))
    chosen = tuple(rec["chosen"])
    assert new.tau == chosen and all(t in (1, 2, 4) for t in chosen)
    clock = ClockModel(new, new.build_tree(), builders.model_dim(new))
    assert new.train.rounds == clock.rounds_within(chosen, deadline) >= 1  # feasible on the clock itself
    assert new.data.validation == 0  # the pilots' split is not the run's
    assert len(rec["candidates"]) == 6 and [2, 2] in rec["candidates"]  # the configured tau is always tried
    rungs = [[t for t in rec["trials"] if t["rung"] == r] for r in range(3)]
    assert len(rungs[0]) == 6 and len(rungs[2]) >= 2 and all(t["score"] is not None for t in rungs[2])
    assert all(t["rounds"] == clock.rounds_within(tuple(t["tau"]), t["budget"]) for t in rec["trials"])
    assert min(rungs[2], key=lambda t: (t["score"], t["tau"]))["tau"] == list(chosen)
    assert rec["cost_core_seconds"] > rec["full_run_core_seconds"] > 0
    assert "# search: successive halving" in written and "pilots cost" in written and "rung 3" in text


def test_optimize_search_can_choose_the_levels_too(tmp_path, capsys):
    cfg_path = small_config(tmp_path, latency={"step_time": 0.01, "uplink_rate": [2e4, 2e4],
                                               "uplink_latency": [0.01, 0.05]})
    out = tmp_path / "chosen.yaml"
    rc = main(["optimize", str(cfg_path), "--search", "halving", "--deadline", "3", "--max-tau", "2",
               "--levels-values", "2", "0", "--candidates", "5", "--write", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rec = json.loads(next(ln for ln in out.read_text().splitlines() if ln.startswith("# search-json: ")).split(": ", 1)[1])
    new = load_config(str(out))
    assert new.quantizer.levels == tuple(rec["chosen_levels"])
    assert all(v in (0, 2) for v in new.quantizer.levels) or new.quantizer.levels == (3, 8)  # or the configured
    assert [2, 2, 3, 8] in rec["candidates"]  # the configured choice is always tried
    assert new.tau == tuple(rec["chosen"]) and all(len(c) == 4 for c in rec["candidates"])
    assert len({tuple(c[2:]) for c in rec["candidates"]}) >= 2  # the design spans the levels too
    clock = ClockModel(new, new.build_tree(), builders.model_dim(new))  # the chosen levels' own clock
    assert new.train.rounds == clock.rounds_within(new.tau, 3.0) >= 1
    for t in rec["trials"]:  # every pilot's rounds on the clock of its own levels: float32 messages are slower
        cfg_t = dataclasses.replace(new, quantizer=dataclasses.replace(new.quantizer, levels=tuple(t["levels"])))
        c = ClockModel(cfg_t, cfg_t.build_tree(), builders.model_dim(cfg_t))
        assert t["rounds"] == c.rounds_within(tuple(t["tau"]), t["budget"])
    assert "levels = [" in text
    rc = main(["optimize", str(small_config(tmp_path, "topk.yaml", quantizer={"kind": ["topk", "qsgd"]})),
               "--search", "halving", "--deadline", "3", "--levels-values", "2"])
    assert rc == 2 and "on links whose codec is qsgd" in capsys.readouterr().err


def test_the_configured_tau_is_a_candidate_even_off_the_value_grid(tmp_path, capsys):
    out = tmp_path / "c.yaml"
    rc = main(["optimize", str(small_config(tmp_path)), "--search", "halving", "--deadline", "2", "--tau-values", "1",
               "4", "--candidates", "3", "--write", str(out)])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(next(ln for ln in out.read_text().splitlines() if ln.startswith("# search-json: ")).split(": ", 1)[1])
    assert rec["candidates"][0] == [2, 2] and rec["grid_size"] == 5  # (1|4)^2 and the configured (2, 2)


@pytest.mark.parametrize("args, message", [
    (["--calibrate"], "drop one of them"),
    (["--eta", "1"], "--eta 1: expected an integer >= 2"),
    (["--lr", "0.5"], "--set train.lr=0.5"),
    (["--validation", "0.9"], "--validation 0.9"),
    (["--tau-values", "0", "2"], "--tau-values [0, 2]: expected integers >= 1"),
    (["--candidates", "0"], "--candidates 0: expected an integer >= 1"),
])
def test_optimize_search_refuses_bad_options(tmp_path, capsys, args, message):
    rc = main(["optimize", str(small_config(tmp_path)), "--search", "halving", "--deadline", "3", *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_optimize_search_refuses_a_deadline_no_round_fits(tmp_path, capsys):
    rc = main(["optimize", str(small_config(tmp_path)), "--search", "halving", "--deadline", "1e-6"])
    assert rc == 2 and "raise --deadline" in capsys.readouterr().err


# ---- data.validation ---------------------------------------------------------------------------------------


def _all_train(data):
    return {k: data.train[k] for k in data.train}


def test_generated_validation_is_each_evaluated_devices_last_training_samples(tmp_path):
    raw = copy.deepcopy(SMALL)
    plain = load_config(raw)
    raw["data"]["validation"] = 0.25
    held = load_config(raw)
    tree = plain.build_tree()
    devs = range(tree.num_devices)
    a, b = builders.local_data(plain, tree, devs, 0, 1), builders.local_data(held, tree, devs, 0, 1)
    ds = builders.generated(plain, builders.dataset(plain))
    for k in devs:
        n = ds.train_size(k)
        m = max(1, round(0.25 * n))
        assert b.samples[k] == n - m == len(b.train[k][1])
        assert torch.equal(b.train[k][0], a.train[k][0][: n - m])  # the training prefix is untouched
    x, y = ds.device(0)
    n0 = ds.train_size(0)
    first = b.test_chunks[0]
    assert torch.equal(b.test_x[first[1]:first[2]], torch.from_numpy(x[n0 - round(0.25 * n0):n0]))
    assert not torch.equal(b.test_x[: len(a.test_x)], a.test_x)  # the test set is not read


def test_pooled_validation_is_a_keyed_disjoint_share_the_same_for_any_rank_count(tmp_path):
    arr = arrays(n_train=80, n_test=20)
    path = tmp_path / "d.npz"
    np.savez(path, train_x=arr["train"][0], train_y=arr["train"][1], train_owner=arr["train"][2],
             test_x=arr["test"][0], test_y=arr["test"][1])
    raw = copy.deepcopy(SMALL)
    raw["data"] = {"name": str(Path(__file__).parent / "arrow_plugin.py") + ":load", "args": {"path": str(path)},
                   "validation": 0.2, "partition": {"kind": "iid"}}
    cfg = load_config(raw)
    tree = cfg.build_tree()
    one = builders.local_data(cfg, tree, range(tree.num_devices), 0, 1)
    assert len(one.test_y) == 16 and int(one.samples.sum()) == 64
    rows = {tuple(r) for r in arr["train"][0].tolist()}
    val = {tuple(r) for r in one.test_x.tolist()}
    trained = {tuple(r) for k in range(tree.num_devices) for r in one.train[k][0].tolist()}
    assert val <= rows and trained <= rows and not (val & trained) and len(val | trained) == 80
    halves = [builders.local_data(cfg, tree, range(3 * r, 3 * r + 3), r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h.test_x for h in halves]), one.test_x)
    for r, h in enumerate(halves):
        for k in range(3 * r, 3 * r + 3):
            assert torch.equal(h.train[k][0], one.train[k][0])
    raw["data"]["validation"] = 0.001
    with pytest.raises(Exception, match="holds out 0"):
        builders.local_data(load_config(raw), tree, range(tree.num_devices), 0, 1)


# ---- output.keep_checkpoint: a completed run trains longer, bit for bit ------------------------------------


def test_a_kept_checkpoint_trains_a_completed_run_longer_bit_for_bit(tmp_path):
    base = load_config(copy.deepcopy(SMALL))

    def run(path, rounds, keep, resume=False):
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, rounds=rounds),
                                  output=dataclasses.replace(base.output, path=str(path), keep_checkpoint=keep,
                                                             checkpoint_every=0))
        return Session(cfg, MPI.COMM_SELF).run(overwrite=not resume, resume=resume)

    run(tmp_path / "a.h5", 2, True)
    assert Path(str(tmp_path / "a.h5") + ".ckpt").exists()
    assert run(tmp_path / "a.h5", 4, True, resume=True).status == "completed"
    run(tmp_path / "b.h5", 4, False)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert np.array_equal(a["metrics/test_loss"][:], b["metrics/test_loss"][:])
        assert np.array_equal(a["model/final"][:], b["model/final"][:])
    with pytest.raises(RunError, match="raise train.rounds above 4"):
        run(tmp_path / "a.h5", 4, True, resume=True)
    assert not Path(str(tmp_path / "b.h5") + ".ckpt").exists()
    with pytest.raises(RunError, match="keep_checkpoint: true keeps its checkpoint"):
        run(tmp_path / "b.h5", 6, False, resume=True)
