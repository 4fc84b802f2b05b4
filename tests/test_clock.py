"""The virtual clock (core/clock.py), pure: it reproduces the closed-form round time exactly in the constant case
for N = 1..4 and unbalanced trees, and follows per-device speeds, downlink times, sampling and shared ingress as
computed by hand on small trees."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qmlhfl_mpi.core.clock import LinkTimes, SystemModel, processor_sharing, round_clock
from qmlhfl_mpi.core.codecs import make_codec
from qmlhfl_mpi.core.participation import Participation
from qmlhfl_mpi.core.plan import Planner
from qmlhfl_mpi.core.theory import LatencyModel, round_time
from qmlhfl_mpi.core.topology import Tree

TREES = {
    "N1": (Tree.from_nested(5), (3,)),
    "N2": (Tree.uniform([2, 3]), (2, 3)),
    "N3": (Tree.uniform([2, 2, 2]), (2, 3, 2)),
    "N3-unbalanced": (Tree.from_nested([[3, 1, 4], [2], [5, 1]]), (1, 2, 3)),
    "N4-unbalanced": (Tree.from_nested([[[2, 1], [3]], [[1, 1, 1]]]), (2, 1, 2, 2)),
}


def bits_of(N, d=1000):
    codecs = [make_codec(s, 64) for s in (4, 16, 0, 8)[:N]]
    return codecs, [8 * c.nbytes(d) for c in codecs]


@pytest.mark.parametrize("name", sorted(TREES))
def test_the_constant_case_reproduces_the_closed_form_exactly(name):
    tree, tau = TREES[name]
    codecs, up = bits_of(tree.N)
    plan = Planner(tree, tau, Participation.full(tree.N), 3).plan(0)
    # dyadic step, rates and latencies: every sum the clock and the closed form make is exact in float64
    lat = LatencyModel(0.25, tuple(2.0 ** (20 + n) for n in range(tree.N)), tuple(0.5 ** (n + 1) for n in range(tree.N)))
    clock = round_clock(plan, tau[0], SystemModel.uniform(tree, lat), up, [0] * tree.N)
    assert clock.duration == round_time(1000, tau, codecs, tree, lat)
    # any values: equal to round-off
    lat = LatencyModel(0.0137, tuple(1.3e6 * (n + 1) for n in range(tree.N)), tuple(0.021 * (n + 1) for n in range(tree.N)))
    clock = round_clock(plan, tau[0], SystemModel.uniform(tree, lat), up, [0] * tree.N)
    assert math.isclose(clock.duration, round_time(1000, tau, codecs, tree, lat), rel_tol=1e-12)
    assert len(clock.device_finish) == sum(plan.trained().values())


def test_per_device_speeds_downlinks_and_the_critical_path_by_hand():
    """Cloud over 2 edges of 2 devices, tau = (2, 2): steps 1, 1, 1, 3 s; uplink 1 s and 2 s; downlink 0.5 s and 0 s."""
    tree, tau = Tree.uniform([2, 2]), (2, 2)
    plan = Planner(tree, tau, Participation.full(2), 0).plan(0)
    links = (LinkTimes(np.full(4, 8.0), np.zeros(4), np.full(4, 16.0), np.zeros(4)),  # 8 bits: 1 s up, 0.5 s down
             LinkTimes(np.full(2, 8.0), np.ones(2), np.full(2, np.inf), np.zeros(2)))  # 1 s + 1 s up, no downlink
    system = SystemModel(np.array([1.0, 1.0, 1.0, 3.0]), links)
    clock = round_clock(plan, tau[0], system, [8, 8], [8, 8])
    # edge 0: each repetition 0.5 (down) + 2 steps x 1 s + 1 (up) = 3.5 s; edge 1: 0.5 + 2 x 3 + 1 = 7.5 s
    # each edge does 2 repetitions: 7 s and 15 s; then its message to the cloud: 2 s -> 9 s and 17 s
    assert clock.duration == 17.0
    assert clock.critical_path(plan) == [(2, 0), (1, 1), (0, 3)]
    # edge 0: 0.5 + 2 = 2.5 (twice), then from 3.5: 4 + 2 = 6 (twice); edge 1: 2.5 and 6.5, then from 7.5: 10 and 14
    assert sorted(clock.device_finish) == [2.5, 2.5, 2.5, 6.0, 6.0, 6.5, 10.0, 14.0]
    assert clock.link_busy.tolist() == [8 * 1.0, 2 * 1.0]  # 8 device messages of 1 s, 2 edge messages of 1 s


def test_a_child_that_does_not_take_part_does_not_delay_the_round():
    tree = Tree.from_nested(6)
    part = Participation((0.5,), (1.0,))
    planner = Planner(tree, (1,), part, 4)
    plan = planner.plan(0)
    drawn = set(plan.aggregations[0].children.tolist())
    slow = next(d for d in range(6) if d not in drawn)
    steps = np.ones(6)
    steps[slow] = 1000.0
    link = LinkTimes(np.full(6, 1.0), np.zeros(6), np.full(6, np.inf), np.zeros(6))
    assert round_clock(plan, 1, SystemModel(steps, (link,)), [1], [0]).duration == 2.0  # 1 step + 1 s up


def test_processor_sharing_by_hand():
    # two messages of 4 bits at rate 2: together 2 bits/s -> each 1 bit/s -> both done at 4 s
    assert processor_sharing(np.array([0.0, 0.0]), np.array([4.0, 4.0]), 2.0).tolist() == [4.0, 4.0]
    # one alone for 1 s (2 bits), then shared: the first has 2 bits left at 1 bit/s -> done at 3; the second then
    # has 2 bits left alone at 2 bits/s -> done at 4
    assert processor_sharing(np.array([0.0, 1.0]), np.array([4.0, 4.0]), 2.0).tolist() == [3.0, 4.0]
    # an idle gap: the second arrives after the first is done
    assert processor_sharing(np.array([0.0, 10.0]), np.array([2.0, 2.0]), 2.0).tolist() == [1.0, 11.0]
    # work is conserved: the channel is never idle while work is left, so the last finishes at sum(bits) / rate
    rng = np.random.default_rng(0)
    bits = rng.uniform(1, 5, 20)
    done = processor_sharing(np.zeros(20), bits, 3.0)
    assert math.isclose(done.max(), bits.sum() / 3.0, rel_tol=1e-9) and (np.argsort(done) == np.argsort(bits)).all()
    with pytest.raises(ValueError, match="rate"):
        processor_sharing(np.zeros(1), np.ones(1), 0.0)


def test_shared_ingress_slows_an_aggregation_down():
    tree = Tree.from_nested(4)
    plan = Planner(tree, (1,), Participation.full(1), 0).plan(0)
    alone = LinkTimes(np.full(4, 8.0), np.zeros(4), np.full(4, np.inf), np.zeros(4))
    shared = LinkTimes(np.full(4, 8.0), np.zeros(4), np.full(4, np.inf), np.zeros(4), shared=True, ingress_rate=8.0)
    steps = np.ones(4)
    assert round_clock(plan, 1, SystemModel(steps, (alone,)), [8], [0]).duration == 2.0    # 1 step + 1 s
    assert round_clock(plan, 1, SystemModel(steps, (shared,)), [8], [0]).duration == 5.0   # 1 step + 4 x 1 s shared
