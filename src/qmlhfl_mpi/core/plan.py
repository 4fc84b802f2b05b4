"""The round as data: what one global round does, planned before anything is trained.

A :class:`Planner` turns (tree, ``tau``, participation, seed, round) into a
:class:`RoundPlan`: the round's aggregations in the order the recursion of
docs/algorithm.md performs them, each with its node, its call (how many
aggregations the node has done before in this round), who takes part, their
weights, the calls that key their messages and their training, and where its
result goes (down to the node's subtree, or up to its parent).  Pure: no MPI,
no torch; every rank computes the same plan, which is why the executor
(:mod:`qmlhfl_mpi.comm.executor`) gives the same model on any number of ranks.

The plan is a flat list of aggregations and a list of events, ``(OPEN, i)``
and ``(CLOSE, i)``, nested like the recursion::

    aggregate(u, v):                    OPEN  u's aggregation
        for each participant c of u:
            c a device:  train c        (inside u's aggregation: train_calls)
            c a node:    tau_n times    OPEN/CLOSE c's aggregations (nested)
            c's message to u            (message_calls; a node's after its last aggregation)
        v' = u's server step             CLOSE u's aggregation: down to u's subtree,
                                               or (u's last repetition) up to u's parent

Keys (docs/results.md, reproducibility): the draws of aggregation ``k`` of
node ``u`` at layer ``n`` come from ``(seed, SAMPLE|AVAIL, n, u, t, k)``;
child ``c``'s message on link ``n`` from ``(seed, QUANT, n, c, t, j)`` with
``j`` its :attr:`Aggregation.message_calls` entry; a device's minibatches from
``(seed, BATCH, c, t, j)`` with ``j`` its :attr:`Aggregation.train_calls`
entry; a downlink from ``(seed, DOWN, n, u, t, k)``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import rng
from .membership import Membership
from .participation import Participation
from .topology import TopologyError, Tree

__all__ = ["CLOSE", "OPEN", "Aggregation", "Planner", "RoundPlan"]

OPEN, CLOSE = 0, 1


@dataclass(frozen=True, eq=False)
class Aggregation:
    """One aggregation of node ``node`` at layer ``layer`` (see the module doc)."""

    layer: int                  # n >= 1
    node: int                   # u, numbered left to right within its layer
    call: int                   # k: the node's aggregations before this one in the round
    parent: int                 # index of the enclosing aggregation in the plan (-1 for the cloud's)
    slot: int                   # position of this node among the parent aggregation's participants (-1: cloud)
    first: bool                 # the node starts from its parent's model (its first repetition)
    last: bool                  # the result goes up to the parent instead of down to the subtree
    children: np.ndarray        # int64: the participating children (layer n-1 ids), in child order
    weights: np.ndarray         # float32: their weights a(c)
    message_calls: np.ndarray   # int64: per participant, its message's call on link n
    train_calls: np.ndarray     # int64, layer 1 only: per participating device, its training call
    group: np.ndarray | None = None  # int64: the children that started (online), of which ``children`` were kept
                                     # (a secure aggregation's key group); None: ``children``

    @property
    def empty(self) -> bool:
        """Nobody takes part: the node keeps its model and nothing moves (a last repetition still sends it up)."""
        return len(self.children) == 0

    @property
    def down(self) -> bool:
        """Whether the new model goes down to the node's subtree (every repetition but the last; the cloud's)."""
        return not self.last and not self.empty


@dataclass(frozen=True, eq=False)
class RoundPlan:
    """The aggregations of global round ``round`` and the order of their events."""

    round: int
    seed: int
    aggregations: tuple[Aggregation, ...]
    events: tuple[tuple[int, int], ...]   # (OPEN or CLOSE, index into aggregations), in execution order
    num_links: int
    members: Membership | None = None     # the tree of the moment (devices under other edges); None: the tree's

    def fanout(self, tree: Tree, agg: Aggregation) -> int:
        """How many children ``agg``'s node has in this round (its downlink reaches all of them)."""
        if agg.layer == 1 and self.members is not None:
            return len(self.members.members(agg.node))
        return len(tree.children(agg.layer, agg.node))

    def message_key(self, agg: Aggregation, j: int) -> tuple[int, ...]:
        """The codec key of participant ``j``'s message in ``agg``: ``(seed, QUANT, n, c, t, call)``."""
        return (self.seed, rng.QUANT, agg.layer, int(agg.children[j]), self.round, int(agg.message_calls[j]))

    def down_key(self, agg: Aggregation) -> tuple[int, ...]:
        """The codec key of ``agg``'s downlink message: ``(seed, DOWN, n, u, t, k)``."""
        return (self.seed, rng.DOWN, agg.layer, agg.node, self.round, agg.call)

    def messages(self) -> np.ndarray:
        """Uplink messages per link (int64, length N) in this round."""
        out = np.zeros(self.num_links, dtype=np.int64)
        for a in self.aggregations:
            out[a.layer - 1] += len(a.children)
        return out

    def downlinks(self, tree: Tree) -> np.ndarray:
        """Models sent down per link (int64, length N): every child of a node, at each of its aggregations whose
        result goes down (how the executor counts ``downlink_bytes``)."""
        out = np.zeros(self.num_links, dtype=np.int64)
        for a in self.aggregations:
            if a.down:
                out[a.layer - 1] += self.fanout(tree, a)
        return out

    def trained(self) -> dict[int, int]:
        """How many local runs each device that trains in this round does."""
        out: dict[int, int] = {}
        for a in self.aggregations:
            if a.layer == 1:
                for c in a.children.tolist():
                    out[c] = out.get(c, 0) + 1
        return out

    def devices(self) -> np.ndarray:
        """The devices that train in this round, ascending (int64)."""
        parts = [a.children for a in self.aggregations if a.layer == 1 and len(a.children)]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[int, Aggregation]]:
        """The events in order, as ``(OPEN or CLOSE, aggregation)``."""
        for kind, i in self.events:
            yield kind, self.aggregations[i]


@dataclass
class Planner:
    """Plans the rounds of one run: the tree, ``tau``, who takes part and how children are weighted.

    ``samples`` (per device) weights children by training samples (``topology.weighting: samples``);
    ``None`` by devices.  Keeps the full-participation weights of every node it has planned."""

    tree: Tree
    tau: Sequence[int]
    participation: Participation
    seed: int
    samples: np.ndarray | None = None
    _weights: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _calls: list[np.ndarray] = field(default_factory=list, repr=False)  # see plan()

    def __post_init__(self) -> None:
        N = self.tree.N
        if len(self.tau) != N or len(self.participation.fraction) != N:
            raise ValueError(f"the tree has N={N} layers but tau has {len(self.tau)} values and participation "
                             f"{len(self.participation.fraction)}")
        # cumulative training samples (exact integers in float64): a node's or a child's size in O(1)
        self._cum = None if self.samples is None else \
            np.concatenate([[0], np.cumsum(np.asarray(self.samples, dtype=np.float64))])

    def _sizes(self, n: int, u: int, positions: np.ndarray | None = None) -> np.ndarray:
        """Float64 sizes ``D(c)`` (devices or training samples) of ``u``'s children at ``positions`` (all)."""
        kids, b = self.tree.children(n, u), self.tree.starts[n - 1]
        if positions is None:
            lo, hi = b[kids.start : kids.stop], b[kids.start + 1 : kids.stop + 1]
        else:
            idx = kids.start + np.asarray(positions, dtype=np.int64)
            lo, hi = b[idx], b[idx + 1]
        return (hi - lo).astype(np.float64) if self._cum is None else self._cum[hi] - self._cum[lo]

    def child_sizes(self, n: int, u: int) -> np.ndarray:
        """Float64 sizes ``D(c)`` of all of node ``u``'s children (devices or training samples)."""
        return self._sizes(n, u)

    def _total(self, n: int, u: int) -> float:
        """``D(u)``: the node's devices or training samples (exactly the sum of its children's)."""
        lo, hi = self.tree.starts[n][u], self.tree.starts[n][u + 1]
        return float(hi - lo) if self._cum is None else float(self._cum[hi] - self._cum[lo])

    def participants(self, n: int, u: int, round_: int, call: int, children: int | None = None) -> np.ndarray:
        """Positions (ascending) among ``u``'s children (``children`` of them; by default the tree's) of those
        that take part in its ``call``-th aggregation."""
        C = len(self.tree.children(n, u)) if children is None else children
        if self.participation.layer_is_full(n):
            return np.arange(C, dtype=np.int64)
        return self.participation.participants(self.seed, n, u, round_, call, C)

    def weights(self, n: int, u: int, chosen: np.ndarray) -> np.ndarray:
        """Float32 weights of the children of ``u`` at positions ``chosen``."""
        if self.participation.layer_is_full(n):
            key = (n, u)
            if key not in self._weights:
                sizes = self._sizes(n, u)
                total = sizes.sum()
                if total <= 0:
                    raise TopologyError(f"node {u} of layer {n} has no training samples: cannot weight its children")
                self._weights[key] = (sizes / total).astype(np.float32)
            return self._weights[key]
        return self.reweight(n, u, chosen)

    def _moment(self, n: int, u: int, members: Membership) -> np.ndarray:
        """Float64 sizes of all of ``u``'s children in the tree of the moment ``members``."""
        if n == 1:
            devices = members.members(u)
            return np.ones(devices.size) if self.samples is None else \
                np.asarray(self.samples, dtype=np.float64)[devices]
        kids = self.tree.children(n, u)
        return members.node_sizes(self.tree, n - 1, self.samples)[kids.start : kids.stop]

    def weights_in(self, n: int, u: int, chosen: np.ndarray, members: Membership) -> np.ndarray:
        """Float32 weights of ``u``'s children at ``chosen`` in the tree of the moment (the same floats as
        :meth:`weights` when it is the tree's); a node whose children hold nothing gives them weight 0."""
        sizes = self._moment(n, u, members)
        total = sizes.sum()
        if self.participation.layer_is_full(n):
            if total <= 0:
                return np.zeros(len(chosen), dtype=np.float32)
            return (sizes / total).astype(np.float32)[chosen]
        return self.participation.weights_of(n, sizes[chosen], float(total), sizes.size)

    def reweight(self, n: int, u: int, positions: np.ndarray, members: Membership | None = None) -> np.ndarray:
        """Float32 weights of the children of ``u`` at ``positions`` when only those are aggregated
        (``participation.weights`` over them: renormalised, or the unbiased estimator's)."""
        if len(positions) == 0:
            return np.zeros(0, dtype=np.float32)
        if members is not None:
            sizes = self._moment(n, u, members)
            return self.participation.weights_of(n, sizes[positions], float(sizes.sum()), sizes.size)
        return self.participation.weights_of(n, self._sizes(n, u, positions), self._total(n, u),
                                             len(self.tree.children(n, u)))

    def prune(self, plan: RoundPlan, keep: Sequence[np.ndarray], online: Sequence[np.ndarray] | None = None
              ) -> RoundPlan:
        """``plan`` with only the participants ``keep[i]`` (a mask over aggregation ``i``'s children) of every
        aggregation: the aggregations under a participant not kept go, the kept ones are re-weighted
        (:meth:`reweight`); the calls that key messages and training stay what they were, so what is kept
        draws the same numbers whatever was dropped.  ``online[i]``: the children that started, recorded as
        :attr:`Aggregation.group`.  ``plan`` itself when everyone is kept."""
        if all(k.all() for k in keep):
            return plan
        aggs = plan.aggregations
        new_index = np.full(len(aggs), -1, dtype=np.int64)
        slot_map: list[np.ndarray] = []
        out: list[Aggregation] = []
        for i, a in enumerate(aggs):
            slot_map.append(np.cumsum(keep[i]) - 1)
            if a.parent >= 0 and (new_index[a.parent] < 0 or not keep[a.parent][a.slot]):
                continue  # under a dropped child
            new_index[i] = len(out)
            k = keep[i]
            if k.all():
                weights = a.weights
            elif a.layer == 1 and plan.members is not None:
                positions = np.searchsorted(plan.members.members(a.node), a.children[k])
                weights = self.reweight(a.layer, a.node, positions, plan.members)
            else:
                positions = a.children[k] - self.tree.children(a.layer, a.node).start
                weights = self.reweight(a.layer, a.node, positions, plan.members)
            out.append(Aggregation(a.layer, a.node, a.call, int(new_index[a.parent]) if a.parent >= 0 else -1,
                                   int(slot_map[a.parent][a.slot]) if a.parent >= 0 else -1, a.first, a.last,
                                   a.children[k], weights, a.message_calls[k],
                                   a.train_calls[k] if a.layer == 1 else a.train_calls,
                                   None if online is None or k.all() else a.children[online[i]]))
        events = tuple((kind, int(new_index[i])) for kind, i in plan.events if new_index[i] >= 0)
        return RoundPlan(plan.round, plan.seed, tuple(out), events, plan.num_links, plan.members)

    def plan(self, round_: int, members: Membership | None = None, only: int | None = None,
             root: tuple[int, int] | None = None, offset: int = 0) -> RoundPlan:
        """The plan of global round ``round_`` (pure: the same on every rank), on the tree of the moment
        ``members`` when given (devices under other edges than the tree's, or none).  ``only``: the root's one
        participant, its child at that position (weight 1): one job of a buffered layer (:mod:`.tiers`).
        ``root``: ``(layer, node)`` the plan starts at (default the cloud).  ``offset``: every call counter
        below the root starts as if ``offset`` such jobs of the child had come before in round ``round_`` (a
        layer-``n`` node aggregates ``prod(tau_{n+1..m})`` times a job under a layer-``m`` root), so a job's
        keys are those the synchronous run gives the same work."""
        tree, tau = self.tree, self.tau
        top, top_node = root if root is not None else (tree.N, 0)
        per_job = [int(np.prod(tau[n:top], dtype=np.int64)) for n in range(top + 1)]  # aggregations a job, by layer
        aggs: list[Aggregation] = []
        events: list[tuple[int, int]] = []
        agg_calls: dict[tuple[int, int], int] = {}
        # call counters over whole layers, kept between plans and reset where this plan touched them (a fresh
        # array per plan would cost a page fault per drawn device of a large population)
        if not self._calls:
            self._calls = [np.zeros(tree.num_nodes(n - 1), dtype=np.int64) for n in range(1, tree.N + 1)]
            self._calls.append(np.zeros(tree.num_devices, dtype=np.int64))
        msg_calls, train_calls = self._calls[:-1], self._calls[-1]
        touched: list[tuple[int, np.ndarray]] = []
        empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)

        def aggregate(n: int, u: int, parent: int, slot: int, first: bool, last: bool) -> None:
            k = agg_calls.get((n, u), offset * per_job[n])
            agg_calls[(n, u)] = k + 1
            if only is not None and n == top:
                chosen = np.array([only], dtype=np.int64)
                kids = tree.children(n, u).start + chosen
            elif n == 1 and members is not None:
                here = members.members(u)
                chosen = self.participants(n, u, round_, k, here.size)
                kids = here[chosen]
            else:
                chosen = self.participants(n, u, round_, k)
                if members is not None:  # a child node holding no device of the moment takes no part
                    held = members.node_sizes(tree, n - 1)[tree.children(n, u).start + chosen]
                    chosen = chosen[held > 0]
                kids = tree.children(n, u).start + chosen
            index = len(aggs)
            aggs.append(None)  # type: ignore[arg-type]  # filled in below, once the nested calls are counted
            events.append((OPEN, index))
            tcalls = empty_i
            if n == 1 and len(kids):
                tcalls = train_calls[kids] + offset * per_job[1]
                train_calls[kids] += 1
                touched.append((tree.N, kids))
            elif len(kids):
                reps = tau[n - 1]  # tau_n aggregations of each child node
                for j, c in enumerate(kids.tolist()):
                    for r in range(reps):
                        aggregate(n - 1, c, index, j, r == 0, r == reps - 1)
            mcalls = msg_calls[n - 1][kids] + offset * per_job[n] if len(kids) else empty_i
            if len(kids):
                msg_calls[n - 1][kids] += 1
                touched.append((n - 1, kids))
            weights = empty_f if not len(kids) else np.ones(1, dtype=np.float32) if only is not None and n == top \
                else self.weights(n, u, chosen) if members is None else self.weights_in(n, u, chosen, members)
            aggs[index] = Aggregation(n, u, k, parent, slot, first, last, kids.astype(np.int64), weights, mcalls,
                                      tcalls)
            events.append((CLOSE, index))

        try:
            aggregate(top, top_node, -1, -1, True, False)
        finally:
            for i, kids in touched:
                self._calls[i][kids] = 0
        return RoundPlan(round_, self.seed, tuple(aggs), tuple(events), tree.N, members)
