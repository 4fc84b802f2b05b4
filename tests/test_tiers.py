"""Buffered layers at any depth (core/tiers.py; the cloud-only schedule: tests/test_buffered.py): full buffers
with equal times are the synchronous rounds; the pause rule; every tie in one order."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from qmlhfl_mpi.core.asynchrony import Staleness
from qmlhfl_mpi.core.tiers import ADOPT, ARRIVE, FLUSH, SEND, START, Tier, TieredSchedule

CONST = Staleness("constant")


def two_levels(edge_times, updates, k_region=2, k_cloud=2, up=0.0, down=0.0):
    """A cloud over 2 regions of 2 edges each (the edges' jobs are the leaves)."""
    tiers = [Tier(3, 0, [0, 1], np.array([2.0, 2.0]), k_cloud, CONST, leaf=False)]
    for r in range(2):
        tiers.append(Tier(2, r, [2 * r, 2 * r + 1], np.ones(2), k_region, CONST, leaf=True, parent=0, slot=r,
                          updates=updates, up=up, down=down))
    return TieredSchedule(tiers, lambda i, c, j, t0: (edge_times[2 * (i - 1) + c], None))


@pytest.mark.parametrize("updates", [1, 2])
def test_full_buffers_with_equal_times_are_synchronous_rounds(updates):
    """Every region updates ``updates`` times from its edges, sends, waits for the cloud's update and every edge
    then starts from the region's adopted model: the synchronous round, again and again."""
    for r, events in zip(range(3), two_levels([1.0] * 4, updates).rounds()):
        kinds = [(e.kind, e.tier) for e in events]
        assert kinds.count((FLUSH, 0)) == 1 and events[-1].kind == FLUSH and events[-1].tier == 0
        assert kinds.count((FLUSH, 1)) == kinds.count((FLUSH, 2)) == updates
        assert kinds.count((SEND, 1)) == kinds.count((SEND, 2)) == 1
        assert all(float(w) == 0.5 for e in events if e.kind == FLUSH for _, w in e.entries)  # nobody stale
        starts = [e for e in events if e.kind == START]
        assert len(starts) == 4 * updates and {e.time for e in starts} == {float(r * updates + u)
                                                                             for u in range(updates)}
        if r:  # the round's first jobs start from the model each region adopted from the cloud (version r)
            adopts = [e for e in events if e.kind == ADOPT]
            assert [e.version for e in adopts] == [r, r] and adopts[0].time == starts[0].time


def test_a_paused_region_holds_its_fast_edges_until_it_adopts():
    """Region 0's edges take 1 s, region 1's 3 s; messages up take 0.5 s and models down 0.25 s. Region 0 sends
    at 1 s and is paused: its edges start nothing until it adopts the cloud's newest model at 1.75 s (the cloud
    has not updated yet: it waits for 2 arrivals). Fast and first: the cloud's first update holds region 0's two
    jobs, both from the cloud's version 0 (the second from a model that does not include the first)."""
    events = list(islice(two_levels([1.0, 1.0, 3.0, 3.0], updates=1, up=0.5, down=0.25).events(), 40))
    send0 = next(e for e in events if e.kind == SEND and e.tier == 1)
    adopt0 = next(e for e in events if e.kind == ADOPT and e.tier == 1)
    assert (send0.time, adopt0.time, adopt0.version) == (1.0, 1.75, 0)
    region0_starts = [e for e in events if e.kind == START and e.tier == 1]
    assert [e.time for e in region0_starts][:4] == [0.0, 0.0, 1.75, 1.75]
    assert [e.version for e in region0_starts][2:4] == [2, 2]  # one update, one adoption
    first = next(e for e in events if e.kind == FLUSH and e.tier == 0)
    assert first.time == 3.25 and [c for c, _ in first.entries] == [0, 0]
    assert [float(w) for _, w in first.entries] == [0.5, 0.5]  # constant staleness: no discount


def test_links_delay_the_message_and_the_adoption_and_ties_go_bottom_up():
    ev = list(islice(two_levels([1.0] * 4, updates=1, up=0.5, down=0.25).events(), 30))
    arrive_cloud = [e.time for e in ev if e.kind == ARRIVE and e.tier == 0]
    adopts = [e.time for e in ev if e.kind == ADOPT]
    assert arrive_cloud[:2] == [1.5, 1.5] and adopts[:2] == [1.75, 1.75]
    order = [(e.time, e.kind, e.tier) for e in ev]
    assert order == sorted(order, key=lambda x: x[0])  # time never goes back
    with pytest.raises(ValueError, match="buffer k = 3 at layer 2 node 0"):
        TieredSchedule([Tier(3, 0, [0], np.ones(1), 1, CONST, leaf=False),
                        Tier(2, 0, [0, 1], np.ones(2), 3, CONST, leaf=True, parent=0, slot=0)], lambda *a: (1.0, None))
