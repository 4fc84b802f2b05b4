"""The round plan, without MPI: its participants, weights, keys and order equal those the serial reference
(tests/reference.py, plain loops) uses, for sampling, availability, both weightings and unbalanced trees."""
from __future__ import annotations

import numpy as np
import pytest

from qmlhfl_mpi.core import rng
from qmlhfl_mpi.core.participation import Participation
from qmlhfl_mpi.core.plan import CLOSE, OPEN, Planner
from qmlhfl_mpi.core.topology import Tree, messages_per_round
from reference import Reference, build_tree


class KeyCodec:
    """Records the keys the reference encodes with; messages are empty (nothing is trained)."""

    def __init__(self, log):
        self.log = log

    def encode(self, x, v, key):
        self.log.append(("message", *key))
        return b""

    def decode_add(self, msg, a, acc):
        pass


class Recording(Reference):
    """The reference's own choices and counts, recorded in the order it makes them; no training."""

    def __init__(self, root, tau, N, seed, samples, **options):
        super().__init__(root, tau, [0] * N, 0, 0.1, 1, seed, model=_Nothing(), train_data=None, samples=samples,
                         **options)
        self.log = []
        self.codecs = [KeyCodec(self.log)] * N

    def vector(self):
        return np.zeros(1, dtype=np.float32)

    def local_sgd(self, device, v, t):
        self.log.append(("train", device, t, self.count(("train", device))))
        return v

    def chosen(self, u, t, call):
        picked, weights = super().chosen(u, t, call)
        self.log.append(("aggregate", u.layer, u.index, t, call, tuple(picked), tuple(float(w) for w in weights)))
        return picked, weights

    def server_step(self, n, u, v, g):
        return v


class _Nothing:
    def parameters(self):
        return []


def from_plan(plan, tree):
    """The plan's records in the reference's order: an aggregation's draw when it opens, its devices' training,
    then each child's message after the child's work (a node's after its last repetition)."""
    out = []
    for kind, a in plan:
        if kind == OPEN:
            first = tree.children(a.layer, a.node).start
            out.append(("aggregate", a.layer, a.node, plan.round, a.call,
                        tuple(int(c) - first for c in a.children), tuple(float(w) for w in a.weights)))
            if a.layer == 1:
                for j, c in enumerate(a.children.tolist()):
                    out.append(("train", c, plan.round, int(a.train_calls[j])))
                    out.append(("message", *plan.message_key(a, j)))
        elif kind == CLOSE and a.last and a.parent >= 0:
            parent = plan.aggregations[a.parent]
            out.append(("message", *plan.message_key(parent, a.slot)))
    return out


CASES = {
    "full": dict(branching=[2, 3, 4], tau=[2, 3, 2]),
    "sampling": dict(branching=[3, 4, 5], tau=[1, 2, 2], fraction=[0.4, 0.5, 1.0]),
    "availability": dict(branching=[2, 5], tau=[2, 3], availability=[0.6, 0.8]),
    "both-unbiased": dict(branching=[2, 3, 6], tau=[1, 2, 3], fraction=[0.5, 1.0, 0.5],
                          availability=[0.9, 0.7, 1.0], weighting="unbiased"),
    "unbalanced": dict(tree=[[3, 1, 4], [2], [5, 1]], tau=[2, 2, 3], fraction=[0.5, 0.7, 1.0]),
    "samples": dict(tree=[[3, 2], [4]], tau=[1, 3, 2], samples=True, availability=[0.7, 1.0, 1.0]),
    "fedavg": dict(tree=7, tau=[3], fraction=[0.3]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_plan_draws_weights_and_keys_as_the_serial_reference(case):
    c = dict(CASES[case])
    spec, branching = c.pop("tree", None), c.pop("branching", None)
    tree = Tree.uniform(branching) if branching else Tree.from_nested(spec)
    N, tau, seed = tree.N, c.pop("tau"), 11
    samples = np.arange(3, 3 + tree.num_devices, dtype=np.int64) if c.pop("samples", False) else None
    fraction = c.pop("fraction", [1.0] * N)
    availability = c.pop("availability", [1.0] * N)
    weighting = c.pop("weighting", "renormalize")
    planner = Planner(tree, tau, Participation(tuple(fraction), tuple(availability), weighting), seed, samples)
    ref = Recording(build_tree(spec, branching), tau, N, seed, samples, fraction=fraction,
                    availability=availability, weighting=weighting)
    for t in range(3):
        ref.log.clear()
        ref.calls = {}
        ref.aggregate(ref.root, ref.vector(), t)
        plan = planner.plan(t)
        assert from_plan(plan, tree) == ref.log, f"round {t}"
        assert [a.layer for a in plan.aggregations].count(N) == 1


def test_full_participation_plans_every_message_of_the_closed_form():
    tree, tau = Tree.from_nested([[3, 1, 4], [2], [5, 1]]), (2, 2, 3)
    plan = Planner(tree, tau, Participation.full(3), 0).plan(4)
    assert plan.messages().tolist() == [messages_per_round(tree, tau, n) for n in (1, 2, 3)]
    assert set(plan.trained().values()) == {2 * 3}  # tau_2 * tau_3 local runs per device
    assert plan.trained().keys() == set(range(tree.num_devices))
    opened = [i for kind, i in plan.events if kind == OPEN]
    closed = [i for kind, i in plan.events if kind == CLOSE]
    assert sorted(opened) == sorted(closed) == list(range(len(plan.aggregations)))
    cloud = plan.aggregations[opened[0]]
    assert (cloud.layer, cloud.node, cloud.parent, cloud.last, cloud.down) == (3, 0, -1, False, True)
    for a in plan.aggregations:  # a node's repetitions: the first inherits, only the last goes up
        if a.parent >= 0:
            assert a.first == (a.call % tau[a.layer] == 0) and a.last == (a.call % tau[a.layer] == tau[a.layer] - 1)
    assert plan.down_key(cloud) == (0, rng.DOWN, 3, 0, 4, 0)


def test_an_aggregation_nobody_joins_is_planned_empty_and_keeps_its_place():
    tree = Tree.uniform([2, 3])
    part = Participation((1.0, 1.0), (0.05, 1.0))  # devices are rarely up
    plan = Planner(tree, (1, 3), part, 5).plan(0)
    empties = [a for a in plan.aggregations if a.empty]
    assert empties, "expected an aggregation without participants"
    for a in empties:
        assert not a.down and len(a.weights) == len(a.message_calls) == len(a.train_calls) == 0
    cloud = plan.aggregations[0]
    assert cloud.children.tolist() == [0, 1]  # every edge still sends its (unchanged) model up


def test_the_plan_command_prints_what_a_run_then_sends(tmp_path, capsys):
    """``qmlhfl-mpi plan`` (in process: it trains nothing) against a real run of the same round: every
    link's messages, bytes and downlink bytes agree."""
    import copy
    import re

    import yaml
    from mpi4py import MPI

    from helpers import SMALL
    from qmlhfl_mpi import Callback, Session, load_config
    from qmlhfl_mpi.cli import main

    raw = copy.deepcopy(SMALL)
    raw.update(topology={"tree": [[3, 1], [2, 2, 1]]}, tau=[2, 2, 2], quantizer={"levels": [3, 8, 0], "bucket": 16,
                                                                                   "downlink": [0, 16, 0]},
               participation={"fraction": [0.5, 1.0, 1.0], "availability": [1.0, 0.7, 1.0]})
    raw["train"]["rounds"] = 2
    raw["output"] = {"path": str(tmp_path / "run.h5")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(path), "--round", "1"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("per link:"))
    planned = [tuple(int(x.replace(",", "")) for x in m) for m in
               re.findall(r"link \d: (\d+) messages of ([\d,]+) bytes \(([\d,]+)\), downlink ([\d,]+) bytes", line)]

    class Last(Callback):
        def on_round_end(self, session, record):
            self.record = record

    last = Last()
    Session(load_config(str(path)), MPI.COMM_SELF).run([last])
    rec = last.record
    assert int(rec["round"]) == 1
    assert [(m, b) for m, _, b, _ in planned] == list(zip(rec["messages"].tolist(), rec["uplink_bytes"].tolist()))
    assert [d for *_, d in planned] == rec["downlink_bytes"].tolist()
    assert "1:0#0" in out and "up to 2:0" in out and "down to" in out
