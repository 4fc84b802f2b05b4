"""Tree, weights, counts and the device -> rank mapping (pure, no MPI)."""
import numpy as np
import pytest

from qmlhfl_mpi.core.topology import (
    RankLayout,
    TopologyError,
    Tree,
    aggregations_per_round,
    balanced_rank_counts,
    check_aligned,
    messages_per_round,
    rank_blocks,
)


def test_uniform_tree_shape():
    t = Tree.uniform([2, 3, 4])
    assert t.N == 3 and t.num_devices == 24
    assert [t.num_nodes(n) for n in range(4)] == [24, 6, 2, 1]
    assert list(t.children(3, 0)) == [0, 1]
    assert list(t.children(2, 1)) == [3, 4, 5]
    assert list(t.children(1, 5)) == list(range(20, 24))
    assert t.device_range(2, 1) == range(12, 24)
    assert t.parent(0, 13) == 3 and t.parent(1, 3) == 1


def test_nested_unbalanced_tree_and_weights():
    t = Tree.from_nested([[3, 2], [4, 1, 2]])
    assert t.N == 3 and t.num_devices == 12
    assert t.starts[1].tolist() == [0, 3, 5, 9, 10, 12]
    assert t.starts[2].tolist() == [0, 5, 12]
    np.testing.assert_allclose(t.weights(3, 0), [5 / 12, 7 / 12])
    np.testing.assert_allclose(t.weights(2, 1), [4 / 7, 1 / 7, 2 / 7])
    np.testing.assert_allclose(t.weights(1, 0), [1 / 3] * 3)
    samples = np.arange(1, 13)
    w = t.weights(2, 0, samples)
    np.testing.assert_allclose(w, [6 / 15, 9 / 15])  # devices 0-2: 1+2+3, devices 3-4: 4+5


def test_fedavg_and_two_layer_specs():
    assert Tree.from_nested(5).N == 1 and Tree.from_nested(5).num_devices == 5
    t = Tree.from_nested([3, 2])
    assert t.N == 2 and t.starts[1].tolist() == [0, 3, 5]


@pytest.mark.parametrize("spec,match", [
    ([[3, 2], 4], "different depths"), ([], "empty"), (0, ">= 1"), ([[1], ["x"]], "integer"),
])
def test_bad_trees_are_rejected(spec, match):
    with pytest.raises(TopologyError, match=match):
        Tree.from_nested(spec)


def test_bad_branching():
    with pytest.raises(TopologyError, match="fan-out"):
        Tree.uniform([2, 0])
    with pytest.raises(TopologyError, match="empty"):
        Tree.uniform([])


def test_counts_per_round():
    t = Tree.uniform([2, 3, 4])
    tau = [5, 2, 3]
    assert [aggregations_per_round(tau, n) for n in (1, 2, 3)] == [6, 3, 1]
    # link 1: 24 devices x 6 layer-1 aggregations; link 2: 6 x 3; link 3: 2 x 1
    assert [messages_per_round(t, tau, n) for n in (1, 2, 3)] == [144, 18, 2]


@pytest.mark.parametrize("t", [Tree.uniform([2, 2, 4]), Tree.from_nested([3, 5]), Tree.from_nested([[3, 2], [4, 1, 2]]),
                               Tree.from_nested(7), Tree.from_nested([[1, 1], [6], [2, 2, 2]])])
def test_every_rank_count_gives_aligned_blocks(t):
    D = t.num_devices
    for p in range(1, D + 1):
        b = rank_blocks(t, p)
        assert b[0] == 0 and b[-1] == D and len(b) == p + 1
        assert np.all(np.diff(b) >= 1)
        check_aligned(t, b)  # raises if not aligned
        L = RankLayout(t, b)
        for n in range(t.N + 1):
            for u in range(t.num_nodes(n)):
                assert L.leader(n, u) == L.rank_of_device(t.device_range(n, u).start)


def test_misaligned_blocks_are_rejected_with_working_counts():
    t = Tree.uniform([2, 4])
    with pytest.raises(TopologyError, match=r"straddle.*\[1, 2, 4, 8\]"):
        check_aligned(t, np.array([0, 3, 8]))
    t2 = Tree.uniform([2, 2])
    with pytest.raises(TopologyError, match=r"5 MPI ranks cannot host a tree of 4 devices.*1\.\.4.*\[1, 2, 4\]"):
        rank_blocks(t2, 5)


def test_balanced_counts_and_layout_queries():
    t = Tree.uniform([2, 2, 4])
    assert balanced_rank_counts(t) == [1, 2, 4, 8, 16]
    L = RankLayout.build(t, 4)
    assert L.bounds.tolist() == [0, 4, 8, 12, 16] and L.load_imbalance() == 1.0
    assert L.spanning_node(1, 2) == 0 and L.spanning_node(1, 1) is None
    assert list(L.ranks_of(3, 0)) == [0, 1, 2, 3]
    L8 = RankLayout.build(t, 8)
    assert L8.spanning_node(3, 1) == 1 and list(L8.nodes_of(3, 0)) == [6, 7]


def test_unbalanced_tree_error_messages_terminate():
    """The message lists the balanced counts without recursing into itself."""
    t = Tree.from_nested([[3, 2], [4, 1]])
    assert balanced_rank_counts(t) == [1, 2, 10]
    with pytest.raises(TopologyError, match=r"11 MPI ranks cannot host a tree of 10 devices.*\[1, 2, 10\]"):
        rank_blocks(t, 11)
    with pytest.raises(TopologyError, match=r"straddle nodes of layer 1; .*\[1, 2, 10\]"):
        check_aligned(t, np.array([0, 2, 10]))
