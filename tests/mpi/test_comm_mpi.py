"""Collective building blocks on the launching communicator (pytest-mpi).

Run by tests/test_pytest_mpi.py as ``mpiexec -n K python -m pytest --with-mpi tests/mpi``;
every test passes at any K >= 1.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from qmlhfl_mpi.comm.collectives import (
    agree_on_error,
    broadcast_vector,
    gather_named_vectors,
    post_receives,
    scatter_named_vectors,
    send_messages,
    sum_over_ranks,
    wait,
)
from qmlhfl_mpi.comm.communicators import build_layer_comms
from qmlhfl_mpi.comm.executor import RoundExecutor
from qmlhfl_mpi.core import rng
from qmlhfl_mpi.core.codecs import make_codec
from qmlhfl_mpi.core.links import Link
from qmlhfl_mpi.core.participation import Participation
from qmlhfl_mpi.core.plan import Planner
from qmlhfl_mpi.core.topology import RankLayout, Tree
from qmlhfl_mpi.core.vectors import HostVectors

TREES = {
    "uniform": lambda: Tree.uniform([2, 2, 3]),
    "unbalanced": lambda: Tree.from_nested([[3, 1], [2], [1, 1, 2]]),
    "fedavg": lambda: Tree.from_nested(6),
}


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(TREES))
def test_layer_comms_match_the_layout(name):
    comm = MPI.COMM_WORLD
    tree = TREES[name]()
    layout = RankLayout.build(tree, comm.size)
    comms = build_layer_comms(comm, layout)
    for n in range(1, tree.N + 1):
        lc = comms[n]
        u = layout.spanning_node(comm.rank, n)
        assert lc.node == u
        if u is None:
            assert lc.subtree is None and lc.leaders is None
            continue
        assert lc.subtree.Get_size() == len(layout.ranks_of(n, u))
        # rank 0 of each communicator is the node's leader
        root = np.array([comm.rank if lc.subtree.Get_rank() == 0 else -1])
        lc.subtree.Bcast(root, root=0)
        assert root[0] == layout.leader(n, u)
        kid_leaders = sorted({layout.leader(n - 1, c) for c in tree.children(n, u)})
        if comm.rank in kid_leaders:
            assert lc.leaders.Get_size() == len(kid_leaders)
            assert lc.leader_counts.sum() == len(tree.children(n, u))
        else:
            assert lc.leaders is None
        lc.free()


@pytest.mark.mpi
@pytest.mark.parametrize("bad_rank", [None, 0, -1])
def test_agree_on_error_reaches_every_rank(bad_rank):
    comm = MPI.COMM_WORLD
    bad = None if bad_rank is None else bad_rank % comm.size
    msg = f"problem seen on rank {comm.rank}" if comm.rank == bad else None
    agreed = agree_on_error(comm, msg)
    if bad is None:
        assert agreed is None
    else:
        assert agreed == f"problem seen on rank {bad}"


@pytest.mark.mpi
def test_messages_arrive_at_rank_0_in_member_order_and_broadcast():
    comm = MPI.COMM_WORLD
    counts = np.arange(1, comm.size + 1, dtype=np.int64)  # rank r sends r+1 messages
    L = 5
    mine = [np.full(L, 10 * comm.rank + i, dtype=np.uint8) for i in range(counts[comm.rank])]
    if comm.rank == 0:
        remote = post_receives(comm, counts, L, tag=3)
        for _, req in remote:
            wait(req)
        got = [m.tolist() for m in mine] + [buf.tolist() for buf, _ in remote]
        expected = [[10 * r + i] * L for r, c in enumerate(counts) for i in range(c)]
        assert got == expected
    else:
        send_messages(comm, mine, tag=3)
    vec = np.arange(7, dtype=np.float32) if comm.rank == 0 else None
    out = broadcast_vector(comm, vec, 7)
    assert np.array_equal(out, np.arange(7, dtype=np.float32))
    total = sum_over_ranks(comm, np.array([1.0, comm.rank]))
    assert total.tolist() == [comm.size, comm.size * (comm.size - 1) / 2]


class FakeClients:
    """Clients whose "training" is a keyed random step: no torch."""

    def __init__(self, dim):
        self.dim = dim

    def train(self, v, devices, round_, calls, peers):
        for device, call in zip(devices, calls):
            g = rng.stream(99, rng.BATCH, device, round_, call)
            yield v * np.float32(0.9) + g.standard_normal(self.dim).astype(np.float32), 1.0, 1


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(TREES))
def test_distributed_round_equals_single_rank(name):
    """The same rounds on all ranks of COMM_WORLD and on COMM_SELF alone give
    bit-identical models (no torch involved)."""
    comm = MPI.COMM_WORLD
    tree = TREES[name]()
    dim = 37
    tau = [2] + [1 + (n % 2) for n in range(1, tree.N)]
    links = [Link(make_codec(s, 8)) for s in ([3, 0, 16][: tree.N])]
    planner = Planner(tree, tau, Participation.full(tree.N), 5)

    def rounds(c):
        layout = RankLayout.build(tree, c.size)
        comms = build_layer_comms(c, layout)
        executor = RoundExecutor(layout, c.rank, comms, links, dim, FakeClients(dim), HostVectors())
        w = np.linspace(-1, 1, dim, dtype=np.float32)
        for t in range(2):
            w = executor.run(planner.plan(t), w)
        steps = sum_over_ranks(c, executor.stats.steps).sum()
        for lc in comms[1:]:
            lc.free()
        return w, steps

    w_all, steps_all = rounds(comm)
    w_one, steps_one = rounds(MPI.COMM_SELF)
    assert np.array_equal(w_all, w_one)
    # the fake trainer reports one step per call; stats cover the last round
    assert steps_all == steps_one == tree.num_devices * np.prod(tau[1:])


@pytest.mark.mpi
def test_named_vectors_gather_to_rank_0_and_scatter_back():
    comm = MPI.COMM_WORLD
    rank, size, dim = comm.Get_rank(), comm.Get_size(), 7
    mine = {f"residual.1.{rank * 10 + j}": np.full(dim, rank + j / 10, dtype=np.float32) for j in range(rank % 3)}
    got = gather_named_vectors(comm, mine, dim)
    expect = {f"residual.1.{r * 10 + j}": np.full(dim, r + j / 10, dtype=np.float32)
              for r in range(size) for j in range(r % 3)}
    if rank == 0:
        assert got is not None and sorted(got) == sorted(expect)
        assert all(np.array_equal(got[k], expect[k]) for k in expect)
        per_rank = [{k: v for k, v in expect.items() if int(k.split(".")[2]) // 10 == (r + 1) % size}
                    for r in range(size)]  # rank r gets the entries of rank r + 1
    else:
        assert got is None
        per_rank = None
    back = scatter_named_vectors(comm, per_rank, dim)
    src = (rank + 1) % size
    assert sorted(back) == sorted(f"residual.1.{src * 10 + j}" for j in range(src % 3))
    assert all(np.array_equal(v, np.full(dim, src + int(k.split(".")[2]) % 10 / 10, dtype=np.float32))
               for k, v in back.items())


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(TREES))
def test_devices_under_other_edges_give_the_same_model_on_any_rank_count(name):
    """Rounds on the tree of the moment (devices under edges led by other ranks, some sitting out, with
    sampling, error feedback on the devices' link and a quantized downlink): the same model on COMM_WORLD
    and COMM_SELF; and on the tree's own membership the point-to-point path gives the model of the plain
    path bit for bit."""
    from qmlhfl_mpi.core.membership import Membership

    comm = MPI.COMM_WORLD
    tree = TREES[name]()
    dim = 29
    tau = [2] + [1 + (n % 2) for n in range(1, tree.N)]
    links = [Link(make_codec(s, 8), error_feedback=n == 0, downlink=make_codec(16, 8) if n == 0 else None)
             for n, s in enumerate([3, 0, 16][: tree.N])]
    part = Participation((0.7,) + (1.0,) * (tree.N - 1), (1.0,) * tree.N)
    planner = Planner(tree, tau, part, 5)
    D, E = tree.num_devices, tree.num_nodes(1)
    g = np.random.default_rng(11)

    def moved(t):
        edge_of = Membership.of_tree(tree).edge_of.copy()
        move = g.random(D) < 0.5
        edge_of[move] = g.integers(-1, E, move.sum())  # -1: sits the round out
        return Membership(edge_of, E)

    memberships = [moved(t) for t in range(3)]

    def rounds(c, plans):
        layout = RankLayout.build(tree, c.size)
        comms = build_layer_comms(c, layout)
        executor = RoundExecutor(layout, c.rank, comms, links, dim, FakeClients(dim), HostVectors(), world=c)
        w = np.linspace(-1, 1, dim, dtype=np.float32)
        for plan in plans:
            w = executor.run(plan, w)
        for lc in comms[1:]:
            if lc is not None:
                lc.free()
        return w

    moving = [planner.plan(t, memberships[t]) for t in range(3)]
    w_all, w_one = rounds(comm, moving), rounds(MPI.COMM_SELF, moving)
    assert np.array_equal(w_all, w_one) and np.isfinite(w_all).all()
    same = [planner.plan(t, Membership.of_tree(tree)) for t in range(2)]
    plain = [planner.plan(t) for t in range(2)]
    assert np.array_equal(rounds(comm, same), rounds(comm, plain))
    assert not np.array_equal(rounds(comm, moving[:2]), rounds(comm, plain))
