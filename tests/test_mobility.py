"""Devices moving between edge servers (core/mobility.py, pure): keyed, rank-free draws; each model's rule; one
clear error for each bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qmlhfl_mpi.core.mobility import MarkovMoves, Mobility, RandomMoves, Static, TraceMoves
from qmlhfl_mpi.core.topology import Tree

TREE = Tree.uniform([3, 4, 50])  # 12 edges of 50 devices


def test_round_zero_is_the_tree_and_static_never_moves():
    mob = Mobility(TREE, Static())
    assert mob.at(0).moved(TREE).size == 0 and mob.at(7).moved(TREE).size == 0


@pytest.mark.parametrize("neighbours", ["uniform", "ring", "grid"])
def test_random_moves_a_share_p_to_allowed_edges_the_same_whatever_the_order_asked(neighbours):
    mob = Mobility(TREE, RandomMoves(0.3, neighbours, seed=4))
    before, after = mob.at(2).edge_of, mob.at(3).edge_of
    moved = before != after
    assert abs(moved.mean() - 0.3) < 0.06  # 600 devices
    cur, new = before[moved], after[moved]
    if neighbours == "ring":
        assert (((new - cur) % 12 == 1) | ((cur - new) % 12 == 1)).all()
    elif neighbours == "grid":
        cols = math.ceil(math.sqrt(12))
        assert (np.abs(new // cols - cur // cols) + np.abs(new % cols - cur % cols) == 1).all()
    else:
        assert len(set(new.tolist())) == 12
    fresh = Mobility(TREE, RandomMoves(0.3, neighbours, seed=4))
    assert np.array_equal(fresh.at(3).edge_of, after)  # stepping from round 0 again gives the same tree
    assert np.array_equal(mob.at(1).edge_of, fresh.at(1).edge_of)  # and going back too
    other = Mobility(TREE, RandomMoves(0.3, neighbours, seed=5))
    assert not np.array_equal(other.at(3).edge_of, after)


def test_random_with_p_zero_or_one():
    assert Mobility(TREE, RandomMoves(0.0, "uniform", 1)).at(4).moved(TREE).size == 0
    full = Mobility(TREE, RandomMoves(1.0, "uniform", 1))
    assert (full.at(1).edge_of != full.at(0).edge_of).all()


def test_markov_follows_its_matrix():
    E = 12
    stay = Mobility(TREE, MarkovMoves(np.eye(E), seed=2))
    assert stay.at(5).moved(TREE).size == 0
    shift = np.roll(np.eye(E), 1, axis=1)  # edge i -> i + 1
    mob = Mobility(TREE, MarkovMoves(shift, seed=2))
    assert np.array_equal(mob.at(2).edge_of, (mob.at(0).edge_of + 2) % E)
    half = np.full((E, E), 0.5 / (E - 1)) + np.eye(E) * (0.5 - 0.5 / (E - 1))  # stay with probability 1/2
    m = Mobility(TREE, MarkovMoves(half, seed=3))
    assert abs((m.at(1).edge_of != m.at(0).edge_of).mean() - 0.5) < 0.07


@pytest.mark.parametrize("matrix, message", [
    (np.ones((2, 3)) / 3, "square matrix"),
    (np.array([[0.5, 0.4], [0.5, 0.5]]), "row 0 sums to 0.9"),
    (np.array([[1.5, -0.5], [0.5, 0.5]]), "finite probability >= 0"),
])
def test_bad_markov_matrices(matrix, message):
    with pytest.raises(ValueError, match=message):
        MarkovMoves(matrix, 0)


def test_a_matrix_for_another_tree_is_refused_when_used():
    with pytest.raises(ValueError, match="2 rows but the tree has 12 edge servers"):
        Mobility(TREE, MarkovMoves(np.eye(2), 0)).at(1)


def test_a_trace_moves_devices_from_its_round_on():
    mob = Mobility(TREE, TraceMoves([(2, 5, 11), (1, 7, 3), (2, 7, 4)], num_devices=600, num_edges=12))
    assert mob.at(0).moved(TREE).size == 0
    assert mob.at(1).edge_of[7] == 3 and mob.at(1).moved(TREE).tolist() == [7]
    assert mob.at(3).edge_of[[5, 7]].tolist() == [11, 4]


@pytest.mark.parametrize("row, message", [((0, 600, 1), "device 600 out of range"), ((0, 1, 12), "edge 12 out of range"),
                                          ((-1, 1, 1), "round -1 out of range")])
def test_bad_trace_rows(row, message):
    with pytest.raises(ValueError, match=message):
        TraceMoves([row], num_devices=600, num_edges=12)


def test_bad_random_options():
    with pytest.raises(ValueError, match="expected a probability"):
        RandomMoves(1.5, "uniform", 0)
    with pytest.raises(ValueError, match="expected one of uniform, ring, grid"):
        RandomMoves(0.5, "torus", 0)


def test_markov_draws_each_row_without_a_devices_by_edges_table():
    """The Markov step searches each edge's cumulative row for its devices' draws (memory O(devices), not
    O(devices x edges)); the same edges as comparing every device's draw with its whole row."""
    from qmlhfl_mpi.core.mobility import _draws

    rng = np.random.default_rng(1)
    E = 30
    m = rng.random((E, E))
    m[:, 3] = 0  # nobody ever goes to edge 3
    m /= m.sum(axis=1, keepdims=True)
    moves = MarkovMoves(m, 5)
    edge_of = rng.integers(-1, E, 5000)
    got = moves.step(edge_of, 3, E)
    on = np.flatnonzero(edge_of >= 0)
    dense = edge_of.copy()
    dense[on] = np.minimum((moves.cum[edge_of[on]] < _draws(5, 3, on, 1)[:, None]).sum(axis=1), E - 1)
    assert np.array_equal(got, dense) and not (got == 3).any() and (got[edge_of < 0] == -1).all()
