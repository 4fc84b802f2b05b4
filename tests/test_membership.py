"""The tree of the moment (core/membership.py) and plans on it: the tree's own membership plans exactly what the
tree plans; moved devices train under their edge of the moment, and weights and downlinks follow its sizes."""
from __future__ import annotations

import numpy as np
import pytest

from qmlhfl_mpi.core.membership import Membership
from qmlhfl_mpi.core.participation import Participation
from qmlhfl_mpi.core.plan import Planner
from qmlhfl_mpi.core.topology import Tree

TREE = Tree.from_nested([[3, 1], [2], [1, 1, 2]])  # 3 regions, 6 edges, 10 devices


def test_the_trees_membership_holds_its_device_ranges():
    m = Membership.of_tree(TREE)
    for u in range(TREE.num_nodes(1)):
        assert m.members(u).tolist() == list(TREE.device_range(1, u))
    assert m.node_sizes(TREE, 2).tolist() == [4.0, 2.0, 4.0] and m.moved(TREE).size == 0
    samples = np.arange(1, 11)
    assert m.node_sizes(TREE, 3, samples).tolist() == [55.0]


def test_moved_devices_and_bad_edge_ids():
    edge_of = Membership.of_tree(TREE).edge_of.copy()
    edge_of[[0, 9]] = [5, -1]  # device 0 to the last edge, device 9 sits out
    m = Membership(edge_of, 6)
    assert m.members(0).tolist() == [1, 2] and m.members(5).tolist() == [0, 8]
    assert m.edge_sizes().tolist() == [2, 1, 2, 1, 1, 2] and m.moved(TREE).tolist() == [0, 9]
    for bad in (6, -2):
        with pytest.raises(ValueError, match=f"edge id {bad} out of range"):
            Membership(np.where(np.arange(10) == 3, bad, edge_of), 6)


@pytest.mark.parametrize("samples", [None, np.arange(3, 13)])
@pytest.mark.parametrize("fraction", [1.0, 0.6])
def test_the_trees_own_membership_plans_exactly_what_the_tree_plans(samples, fraction):
    part = Participation((fraction, 1.0, 1.0), (1.0, 1.0, 1.0), "unbiased" if samples is not None else "renormalize")
    planner = Planner(TREE, (2, 2, 1), part, 3, samples)
    for t in range(3):
        a, b = planner.plan(t), planner.plan(t, Membership.of_tree(TREE))
        assert a.events == b.events and len(a.aggregations) == len(b.aggregations)
        for x, y in zip(a.aggregations, b.aggregations):
            assert (x.layer, x.node, x.call, x.parent, x.slot) == (y.layer, y.node, y.call, y.parent, y.slot)
            for f in ("children", "weights", "message_calls", "train_calls"):
                assert np.array_equal(getattr(x, f), getattr(y, f)), (t, x.layer, x.node, f)
        assert np.array_equal(a.downlinks(TREE), b.downlinks(TREE))


def test_weights_and_downlinks_follow_the_tree_of_the_moment():
    edge_of = Membership.of_tree(TREE).edge_of.copy()
    edge_of[[0, 1, 2]] = 4  # the first edge's three devices move to edge 4 (region 2); device 3 stays
    m = Membership(edge_of, 6)
    plan = Planner(TREE, (1, 1, 1), Participation.full(3), 0).plan(0, m)
    by_node = {(a.layer, a.node): a for a in plan.aggregations}
    assert by_node[(1, 4)].children.tolist() == [0, 1, 2, 7]
    assert np.allclose(by_node[(1, 4)].weights, 0.25)
    assert (1, 0) not in by_node  # nobody left under edge 0: it takes no part in its parent's aggregation
    assert by_node[(2, 0)].children.tolist() == [1] and np.allclose(by_node[(2, 0)].weights, [1.0])
    assert plan.messages()[1] == 5  # edges 1..5 send to their regions; the empty edge 0 sends nothing
    assert np.allclose(by_node[(2, 2)].weights, [1 / 7, 4 / 7, 2 / 7])  # edges of 1, 4 and 2 devices
    assert np.allclose(by_node[(3, 0)].weights, [0.1, 0.2, 0.7])
    plain = Planner(TREE, (1, 1, 1), Participation.full(3), 0).plan(0)
    assert plan.downlinks(TREE)[0] == plain.downlinks(TREE)[0] == 0  # tau = 1: no edge sends down mid-round
    two = Planner(TREE, (1, 2, 1), Participation.full(3), 0)  # every edge sends down once mid-round
    assert two.plan(0, m).downlinks(TREE)[0] == two.plan(0).downlinks(TREE)[0] == 10  # to its devices of the moment
    edge_of[9] = -1  # sits out: nobody sends it a model
    assert two.plan(0, Membership(edge_of, 6)).downlinks(TREE)[0] == 9


def test_pruning_on_the_tree_of_the_moment_reweights_over_its_members():
    edge_of = Membership.of_tree(TREE).edge_of.copy()
    edge_of[[0, 1]] = 4
    m = Membership(edge_of, 6)
    planner = Planner(TREE, (1, 1, 1), Participation.full(3), 0)
    plan = planner.plan(0, m)
    keep = [np.ones(len(a.children), dtype=bool) for a in plan.aggregations]
    i = next(i for i, a in enumerate(plan.aggregations) if (a.layer, a.node) == (1, 4))
    keep[i][plan.aggregations[i].children.tolist().index(1)] = False
    pruned = planner.prune(plan, keep)
    a = next(a for a in pruned.aggregations if (a.layer, a.node) == (1, 4))
    assert a.children.tolist() == [0, 7] and np.allclose(a.weights, 0.5) and pruned.members is m
