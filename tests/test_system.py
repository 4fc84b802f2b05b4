"""The system model, the policies and the round planned against the clock (pure): distributions and traces, the
dropped counts and the kept plan computed by hand on a small tree, availability in time, and bad values."""
from __future__ import annotations

import numpy as np
import pytest

from qmlhfl_mpi.core.clock import LinkTimes, SystemModel
from qmlhfl_mpi.core.participation import Participation
from qmlhfl_mpi.core.plan import Planner
from qmlhfl_mpi.core.policy import All, Deadline, FirstK, make_policy
from qmlhfl_mpi.core.scheduler import RoundScheduler
from qmlhfl_mpi.core.system import (
    Availability,
    DeviceTrace,
    Distribution,
    LinkTrace,
    SystemSpec,
    TraceError,
    jitter_factors,
    once_factors,
)
from qmlhfl_mpi.core.theory import LatencyModel
from qmlhfl_mpi.core.topology import Tree


def test_distributions_parse_draw_and_refuse_bad_text():
    assert Distribution.parse(" lognormal( 0.5 ) ", "k") == Distribution("lognormal", (0.5,))
    assert Distribution.parse("uniform(0.5, 2)", "k").args == (0.5, 2.0)
    assert Distribution.parse("lognormal(0)", "k").constant
    f = once_factors(Distribution.parse("lognormal(1)", "k"), (3, 11, 0), 20000)
    assert abs(np.median(np.log(f))) < 0.03 and abs(np.std(np.log(f)) - 1) < 0.03  # median 1, sigma 1
    p = once_factors(Distribution.parse("pareto(2)", "k"), (3, 11, 0), 20000)
    assert p.min() >= 1 and abs(np.mean(p) - 2) < 0.1  # x_m = 1: mean alpha / (alpha - 1)
    u = once_factors(Distribution.parse("uniform(0.5, 2)", "k"), (3, 11, 0), 1000)
    assert 0.5 <= u.min() and u.max() <= 2
    for bad in ("gauss(1)", "lognormal(-1)", "pareto(0)", "uniform(2, 1)", "uniform(1)", "lognormal(x)", "constant(1)"):
        with pytest.raises(TraceError, match="config key 'system.speed'"):
            Distribution.parse(bad, "system.speed")


def test_jitter_is_counter_based_per_device_and_round():
    d = Distribution.parse("lognormal(0.3)", "k")
    all_ = jitter_factors(d, 5, 2, np.arange(100))
    some = jitter_factors(d, 5, 2, np.array([70, 3, 41]))
    assert np.array_equal(some, all_[[70, 3, 41]])  # a device's draw does not depend on who else is drawn
    assert not np.array_equal(all_, jitter_factors(d, 5, 3, np.arange(100)))  # anew every round
    assert (all_ > 0).all() and np.isfinite(all_).all()


def small_scheduler(policies, availability=None, tau=(1, 2)):
    """Cloud over 2 edges of 2 devices: steps 1, 2, 3, 4 s; link 1 free, link 2 one second of latency."""
    tree = Tree.uniform([2, 2])
    links = (LinkTimes(np.full(4, 1e300), np.zeros(4), np.full(4, np.inf), np.zeros(4)),
             LinkTimes(np.full(2, 1e300), np.ones(2), np.full(2, np.inf), np.zeros(2)))
    system = SystemModel(np.array([1.0, 2.0, 3.0, 4.0]), links, availability=availability)
    return RoundScheduler(Planner(tree, tau, Participation.full(2), 0), system, policies, (8, 8), (8, 8))


def test_dropped_counts_and_the_kept_plan_by_hand():
    s = small_scheduler((Deadline(2.5, 1), FirstK(1)))
    timed = s.round(0)
    # edge 0: arrivals 1, 2 (both within 2.5 s), then from 2: 3, 4 (within 4.5): ends at 2 and 4
    # edge 1: arrivals 3, 4, none within 2.5: waits for its first (device 2) at 3; from 3: 6, 7 -> keeps 2 at 6
    # cloud: edge 0 arrives at 4 + 1 = 5, edge 1 at 6 + 1 = 7; first_k = 1 keeps edge 0: the round ends at 5
    assert timed.duration == 5.0
    assert timed.clock.dropped.tolist() == [2, 1]
    assert timed.critical_path().tolist() == [1, 0, 0]  # device 1, edge 0, the cloud (node 0)
    plan = timed.plan
    assert [(a.layer, a.node, a.children.tolist()) for a in plan.aggregations] == \
        [(2, 0, [0]), (1, 0, [0, 1]), (1, 0, [0, 1])]
    assert plan.aggregations[0].weights.tolist() == [1.0]
    assert plan.aggregations[0].message_calls.tolist() == [0]
    assert [a.parent for a in plan.aggregations] == [-1, 0, 0] and [a.slot for a in plan.aggregations] == [-1, 0, 0]
    # sent: 8 messages on link 1 (4 aggregations of 2), 2 on link 2; aggregated: 4 and 1
    assert timed.extra_messages.tolist() == [4, 1]
    # models sent down: edge 1's first repetition (2 devices) is inside the dropped subtree
    assert timed.extra_downlinks.tolist() == [2, 0]
    rec = timed.record(10.0)
    assert rec["virtual_time"] == 15.0 and rec["offline"] == 0
    assert rec["finish_time"][0] == 1.0 and rec["finish_time"][-1] == 7.0


def test_all_keeps_the_drawn_plan_itself_and_the_deadline_timer_ends_an_aggregation():
    s = small_scheduler((All(), All()))
    timed = s.round(0)
    assert timed.plan is timed.drawn and timed.clock.dropped.tolist() == [0, 0]
    assert timed.duration == 4 + 4 + 1  # edge 1: 4 s twice, then its message
    s = small_scheduler((Deadline(3.5, 0), All()))
    timed = s.round(0)
    # edge 0: 1, 2 within; from 2: 3, 4 within 5.5. edge 1: 3 within 3.5, 4 not: ends at the deadline, 3.5;
    # from 3.5: 6.5 within 7, 7.5 not: ends at 7; the cloud waits for edge 1: 7 + 1
    assert timed.duration == 8.0 and timed.clock.dropped.tolist() == [2, 0]
    assert timed.critical_path().tolist() == [-1, 1, 0]  # edge 1 waited for its timer


def test_a_deadline_nobody_meets_with_min_children_zero_is_found():
    s = small_scheduler((Deadline(0.5, 0), All()))
    timed = s.round(0)
    assert s.unmet_deadlines(timed) == [(1, 1.0)]
    assert [len(a.children) for a in timed.plan.aggregations] == [2, 0, 0, 0, 0]  # empty: edges keep their model


def test_availability_in_time_and_offline_devices():
    av = Availability({1: (np.array([0.0, 10.0]), np.array([1.0, 20.0]))}, period=30.0)
    assert av.online(np.array([0, 1]), 0.5).tolist() == [True, True]
    assert av.online(np.array([1]), 5.0).tolist() == [False]
    assert av.online(np.array([1]), 40.5).tolist() == [True]  # 40.5 mod 30 = 10.5
    assert av.online(np.array([1]), 20.0).tolist() == [False]  # [online, offline)
    s = small_scheduler((All(), All()), availability=Availability({1: (np.array([0.0]), np.array([1.0]))}))
    timed = s.round(0, t0=0.0)  # edge 0: device 1 is online at 0, offline when the second repetition starts at 2
    assert timed.clock.offline == 1
    assert [a.children.tolist() for a in timed.plan.aggregations] == [[0, 1], [0, 1], [0], [2, 3], [2, 3]]
    assert timed.clock.dropped.tolist() == [0, 0] and timed.extra_messages.tolist() == [0, 0]
    late = s.round(0, t0=100.0)  # no interval covers t0 + anything: device 1 never takes part
    assert late.clock.offline == 2


def test_policies_by_hand_and_plugins():
    arrive = np.array([3.0, 1.0, 2.0, 1.0])
    keep, end, last = FirstK(2).select(arrive, 0.0)
    assert keep.tolist() == [False, True, False, True] and end == 1.0 and last == 3  # ties by child order
    keep, end, last = Deadline(1.5, 3).select(arrive, 0.0)  # two within, three wanted: the third to arrive
    assert keep.tolist() == [False, True, True, True] and end == 2.0 and last == 2
    keep, end, last = Deadline(2.5, 1).select(arrive, 0.0)
    assert keep.tolist() == [False, True, True, True] and end == 2.5 and last == -1
    assert isinstance(make_policy("first_k", k=3, deadline=0.0, min_children=1), FirstK)
    with pytest.raises(ValueError, match="deadline"):
        make_policy("deadline", deadline=0.0, min_children=1, k=1)


def test_the_built_system_follows_traces_spreads_and_base_values(tmp_path):
    tree = Tree.uniform([2, 3])
    (tmp_path / "dev.csv").write_text("# a comment\ndevice,step_seconds,up_rate\n0,0.5,\n1,0.25,1000\n")
    (tmp_path / "links.csv").write_text("link,child,up_latency,down_rate\n2,1,0.5,4000\n")
    spec = SystemSpec(link_spread=(Distribution(), Distribution.parse("uniform(1, 2)", "k")),
                      down_rate=(0.0, 100.0), shared=(False, True),
                      device_trace=DeviceTrace.read(str(tmp_path / "dev.csv"), "system.device_trace"),
                      link_trace=LinkTrace.read(str(tmp_path / "links.csv"), "system.link_trace", [6, 2]))
    lat = LatencyModel(0.01, (1e6, 2e6), (0.01, 0.02))
    system = SystemModel.build(tree, lat, spec, seed=4)
    assert system.step_seconds.tolist() == [0.5, 0.25] * 3  # device d takes row d mod 2
    up1 = system.links[0].up_rate
    assert up1.tolist() == [1e6, 1000.0] * 3 and np.isinf(system.links[0].down_rate).all()
    l2 = system.links[1]
    assert ((l2.up_rate >= 2e6) & (l2.up_rate <= 4e6)).all() and l2.shared and l2.ingress_rate == 2e6
    factor = l2.up_rate / 2e6  # the spread multiplies configured and traced rates alike
    assert l2.up_latency.tolist() == [0.02, 0.5] and l2.down_rate.tolist() == (factor * [100.0, 4000.0]).tolist()
    again = SystemModel.build(tree, lat, spec, seed=4)
    assert np.array_equal(again.links[1].up_rate, l2.up_rate)  # keyed: the same on every rank


@pytest.mark.parametrize("text, match", [
    (None, "no such file"),
    ("", "the file is empty"),
    ("device,speed\n0,1\n", "missing column"),
    ("device,step_seconds\n", "no data rows"),
    ("device,step_seconds\n0,fast\n", "line 2, column 'step_seconds'"),
    ("device,step_seconds\n0,1,2\n", "line 2 has 3 fields"),
    ("device,step_seconds\n0,-1\n", "expected numbers > 0"),
    ("device,step_seconds\n0,1\n0,2\n", "several rows"),
    ("device,step_seconds\n0,1\n2,2\n", "must list the ids 0..1"),
])
def test_broken_device_traces_name_the_key_and_the_line(tmp_path, text, match):
    p = tmp_path / "t.csv"
    if text is not None:
        p.write_text(text)
    with pytest.raises(TraceError, match=match) as e:
        DeviceTrace.read(str(p), "system.device_trace")
    assert "system.device_trace" in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("device,online,offline\n9,0,1\n", "device ids 0..5"),
    ("device,online,offline\n0,2,1\n", "0 <= online <= offline"),
    ("device,online,offline\n0,0,5\n0,4,6\n", "overlapping"),
    ("device,online,offline\n0,0,50\n", "after the end of the period"),
])
def test_broken_availability_traces(tmp_path, text, match):
    p = tmp_path / "a.csv"
    p.write_text(text)
    with pytest.raises(TraceError, match=match):
        Availability.read(str(p), "system.availability_trace", 6, period=40.0)


# ---- the trace generator and the examples, end to end ------------------------------------------------------
GENERATED_WITH = ["--devices", "8", "--seed", "1", "--step-seconds", "0.01", "--speed-sigma", "0.7", "--up-rate", "2e6",
                  "--horizon", "2", "--mean-online", "0.4", "--mean-offline", "0.15", "--always-online", "0.25"]


def test_the_shipped_traces_are_what_the_generator_writes_and_nothing_is_overwritten(tmp_path, capsys):
    from helpers import REPO
    from qmlhfl_mpi.cli import main

    assert main(["traces", str(tmp_path), *GENERATED_WITH]) == 0
    for name in ("devices.csv", "behaviour.csv"):  # the command in configs/examples/traces.yaml's header
        assert (tmp_path / name).read_text() == (REPO / "configs/examples/traces" / name).read_text(), name
    before = (tmp_path / "devices.csv").read_text()
    assert main(["traces", str(tmp_path), "--devices", "3"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (tmp_path / "devices.csv").read_text() == before
    assert main(["traces", str(tmp_path / "x"), "--devices", "0"]) == 2
    assert "devices = 0" in capsys.readouterr().err
    av = Availability.read(str(tmp_path / "behaviour.csv"), "k", 8, period=2.0)
    assert 0 < len(av.intervals) < 8  # some devices always online, the others in turns
    never = tmp_path / "never"  # offline longer than the horizon: listed with an empty interval, never online
    assert main(["traces", str(never), "--devices", "4", "--horizon", "1", "--mean-offline", "1e6",
                 "--mean-online", "1e-6", "--always-online", "0"]) == 0
    av = Availability.read(str(never / "behaviour.csv"), "k", 4, period=0.0)
    assert not any(av.online(np.arange(4), t).any() for t in (0.0, 0.5, 2.0))


@pytest.mark.parametrize("name", ["stragglers", "traces"])
def test_the_clock_examples_run_under_mpiexec_and_drop_messages(tmp_path, name):
    import h5py

    from helpers import REPO, run_cli

    out = tmp_path / f"{name}.h5"
    proc, _ = run_cli(2, ["run", f"configs/examples/{name}.yaml", "--quiet", "--set", f"output.path={out}",
                          "--set", "train.rounds=4"], timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        m = f["metrics"]
        assert f.attrs["status"] == "completed" and m["dropped"][()].sum() > 0
        assert (np.diff(m["virtual_time"][()]) > 0).all()


def test_check_and_optimize_see_the_clock(tmp_path, capsys):
    """check: the virtual round time, its spread and what dominates; optimize: the closed form fitted to the
    clock (slow devices make the fitted step time longer than the median device's) and the rounds on the clock."""
    import re

    from helpers import small_config
    from qmlhfl_mpi import load_config
    from qmlhfl_mpi.analysis.clockfit import ClockModel
    from qmlhfl_mpi.cli import main

    cfg_path = small_config(tmp_path, system={"speed": "lognormal(1)", "jitter": "lognormal(0.3)"},
                            latency={"step_time": 0.05}, train={"rounds": 5})
    assert main(["check", str(cfg_path), "--L", "1.0"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"virtual time per round under the system model \(docs/system.md, 5 rounds\): mean ([\d.e+-]+) s, "
                  r"min ([\d.e+-]+) s, max ([\d.e+-]+) s", out)
    assert m and float(m.group(2)) < float(m.group(3)), out  # the jitter spreads the rounds
    assert "dominant: compute" in out and "critical path: ends at device" in out
    assert main(["optimize", str(cfg_path), "--L", "1.0", "--deadline", "3", "--max-tau", "6", "--random", "5"]) == 0
    out = capsys.readouterr().out
    step = float(re.search(r"fitted to the virtual clock \(docs/system.md\): ([\d.e+-]+) s per SGD step", out).group(1))
    assert step > 0.05  # the aggregations wait for the slowest of their devices
    m = re.search(r"on the virtual clock itself, (\d+) rounds of tau = \[([\d, ]+)\] end within the deadline", out)
    assert m, out
    tau, rounds = [int(v) for v in m.group(2).split(",")], int(m.group(1))
    cfg = load_config(str(cfg_path))
    times = np.cumsum(ClockModel(cfg, cfg.build_tree(), _dim(cfg)).durations(tau, rounds + 1))
    assert times[rounds - 1] <= 3 < times[rounds] if rounds else times[0] > 3


def _dim(cfg):
    from qmlhfl_mpi.config import build

    return build.model_dim(cfg)


def test_a_config_from_before_the_clock_resumes_its_absent_sections_count_as_defaults():
    import yaml

    from helpers import SMALL
    from qmlhfl_mpi import load_config
    from qmlhfl_mpi.config.schema import config_diff

    cfg = load_config(SMALL)
    old = yaml.safe_load(cfg.to_yaml())
    del old["system"], old["aggregation"]  # what version 0.x wrote
    assert config_diff(yaml.safe_dump(old), cfg) == []
    slow = load_config({**SMALL, "system": {"speed": "lognormal(1)"}})
    assert config_diff(yaml.safe_dump(old), slow) == ["system.speed: 'constant' -> 'lognormal(1)'"]


def test_system_seed_keeps_one_network_while_the_run_seed_varies():
    import copy

    from helpers import SMALL
    from qmlhfl_mpi import load_config
    from qmlhfl_mpi.analysis.clockfit import ClockModel
    from qmlhfl_mpi.config.build import model_dim

    def durations(train_seed, system_seed):
        raw = copy.deepcopy(SMALL)
        raw["train"]["seed"] = train_seed
        raw["system"] = {"speed": "lognormal(1)", "jitter": "lognormal(0.5)", "link_spread": ["lognormal(1)", "constant"],
                         "seed": system_seed}
        cfg = load_config(raw)
        return ClockModel(cfg, cfg.build_tree(), model_dim(cfg)).durations(cfg.tau, 4)

    fixed = durations(1, 5)
    assert np.array_equal(durations(2, 5), fixed)                # the run's seed does not move the network
    assert not np.array_equal(durations(1, 6), fixed)            # its own seed does
    assert np.array_equal(durations(5, None), fixed)             # null: the run's seed, as before
