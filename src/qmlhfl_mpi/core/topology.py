"""Aggregation tree, aggregation weights and the device -> rank mapping.

Pure Python/numpy: no MPI.  Layers are numbered ``0..N``: layer 0 holds the
devices, layer ``N`` the cloud.  Devices are numbered in depth-first order, so
every node covers a contiguous range of devices; node ``u`` of layer ``n``
covers ``device_range(n, u)``.  Nodes of one layer are numbered left to right.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class TopologyError(ValueError):
    """A tree specification or a rank count that does not fit the tree."""


def _check_spec_node(x: Any, path: str) -> None:
    """Raise :class:`TopologyError` unless ``x`` (at ``topology.tree<path>``) is an integer >= 1 or a non-empty list."""
    if isinstance(x, bool) or not isinstance(x, (int, list, tuple)):
        raise TopologyError(f"topology.tree{path}={x!r}: expected an integer >= 1 or a list")
    if isinstance(x, int) and x < 1:
        raise TopologyError(f"topology.tree{path}={x}: a layer-1 node needs >= 1 device")
    if not isinstance(x, int) and len(x) == 0:
        raise TopologyError(f"topology.tree{path} is an empty list: every node needs a child")


def _same_depth(depths: set[int], path: str) -> int:
    """The one depth of a node's subtrees; :class:`TopologyError` if they differ."""
    if len(depths) != 1:
        raise TopologyError(
            f"topology.tree{path} mixes subtrees of different depths {sorted(depths)}: "
            "all devices must sit at the same depth"
        )
    return depths.pop()


@dataclass(frozen=True, eq=False)
class Tree:
    """A rooted tree whose leaves (devices) all sit at layer 0.

    ``starts[n]`` is an int64 array of length ``num_nodes(n) + 1``: node ``u`` of
    layer ``n`` covers devices ``starts[n][u] .. starts[n][u+1]-1``.
    """

    starts: tuple[np.ndarray, ...]

    # ---- construction -------------------------------------------------
    @classmethod
    def uniform(cls, branching: Sequence[int]) -> Tree:
        """Balanced tree; ``branching[0]`` children of the cloud, ..., ``branching[-1]``
        devices under each layer-1 node.  ``N = len(branching)``."""
        if len(branching) < 1:
            raise TopologyError("topology.branching is empty: give one fan-out per layer, e.g. [2, 4]")
        for i, b in enumerate(branching):
            if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                raise TopologyError(f"topology.branching[{i}]={b!r}: every fan-out must be an integer >= 1")
        spec: Any = branching[-1]
        for b in reversed(branching[:-1]):
            spec = [spec] * b
        return cls.from_nested(spec)

    @classmethod
    def from_nested(cls, spec: Any) -> Tree:
        """Explicit tree as nested lists; an integer ``k`` is a layer-1 node with ``k``
        devices.  ``5`` is FedAvg with 5 devices (N=1), ``[3, 2]`` a cloud with two
        edge servers of 3 and 2 devices (N=2), ``[[3, 2], [4]]`` has N=3."""

        def depth(x: Any, path: str) -> int:
            _check_spec_node(x, path)
            if isinstance(x, int):
                return 1
            return _same_depth({depth(c, f"{path}[{i}]") for i, c in enumerate(x)}, path) + 1

        n_layers = depth(spec, "")
        # bounds per layer, built bottom-up by walking the nesting
        starts: list[list[int]] = [[0] for _ in range(n_layers + 1)]

        def walk(x: Any, layer: int) -> None:
            if isinstance(x, int):  # layer-1 node with x devices
                base = starts[0][-1]
                starts[0].extend(range(base + 1, base + x + 1))
            else:
                for c in x:
                    walk(c, layer - 1)
            starts[layer].append(starts[0][-1])

        walk(spec, n_layers)
        return cls(tuple(np.asarray(s, dtype=np.int64) for s in starts))

    # ---- queries ---------------------------------------------------------
    @property
    def N(self) -> int:
        """Number of aggregation layers (the cloud's layer index)."""
        return len(self.starts) - 1

    @property
    def num_devices(self) -> int:
        return int(self.starts[0][-1])

    def num_nodes(self, n: int) -> int:
        return len(self.starts[n]) - 1

    def device_range(self, n: int, u: int) -> range:
        return range(int(self.starts[n][u]), int(self.starts[n][u + 1]))

    def children(self, n: int, u: int) -> range:
        """Indices at layer ``n-1`` of the children of node ``u`` at layer ``n >= 1``."""
        lo = int(np.searchsorted(self.starts[n - 1], self.starts[n][u]))
        hi = int(np.searchsorted(self.starts[n - 1], self.starts[n][u + 1]))
        return range(lo, hi)

    def parent(self, n: int, u: int) -> int:
        """Index at layer ``n+1`` of the parent of node ``u`` at layer ``n < N``."""
        return int(np.searchsorted(self.starts[n + 1], self.starts[n][u], side="right") - 1)

    def node_of_device(self, n: int, device: int) -> int:
        return int(np.searchsorted(self.starts[n], device, side="right") - 1)

    def weights(self, n: int, u: int, samples: np.ndarray | None = None) -> np.ndarray:
        """Aggregation weights ``a(c)`` of the children of node ``u`` (layer ``n``).

        ``D(c)/D(u)`` (device counts, the paper's) or, with per-device
        ``samples``, ``S(c)/S(u)``.  float64, summing to one.
        """
        counts = self.child_sizes(n, u, samples)
        total = counts.sum()
        if total <= 0:
            raise TopologyError(f"node {u} of layer {n} has no training samples: cannot weight its children")
        return counts / total

    def child_sizes(self, n: int, u: int, samples: np.ndarray | None = None) -> np.ndarray:
        """Sizes ``D(c)`` of the children of node ``u`` (layer ``n``): devices, or training
        samples with per-device ``samples``; float64."""
        kids = self.children(n, u)
        b = self.starts[n - 1][kids.start : kids.stop + 1]
        if samples is None:
            return np.diff(b).astype(np.float64)
        cum = np.concatenate([[0], np.cumsum(np.asarray(samples, dtype=np.float64))])
        return cum[b[1:]] - cum[b[:-1]]

    def describe(self) -> str:
        sizes = [self.num_nodes(n) for n in range(self.N, -1, -1)]
        return f"N={self.N}, nodes per layer (cloud -> devices) {sizes}"


@dataclass(frozen=True)
class TreeShape:
    """How big a tree is, counted from its specification without building it (for the memory estimate):
    ``nodes[n]`` nodes at layer ``n`` (``nodes[0]`` devices) and ``max_children[n]`` the most children of
    a node at layer ``n >= 1`` (``max_children[0] = 0``), ``min_children[n]`` the fewest."""

    nodes: tuple[int, ...]
    max_children: tuple[int, ...]
    min_children: tuple[int, ...] = ()

    @property
    def devices(self) -> int:
        return self.nodes[0]

    @classmethod
    def of(cls, branching: Sequence[int] | None, nested: Any = None) -> TreeShape:
        """The shape of ``Tree.uniform(branching)`` or ``Tree.from_nested(nested)``, without expanding it; a bad
        specification raises the same :class:`TopologyError`."""
        if branching is not None:
            if not branching:
                raise TopologyError("topology.branching is empty: give one fan-out per layer, e.g. [2, 4]")
            for i, b in enumerate(branching):
                if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                    raise TopologyError(f"topology.branching[{i}]={b!r}: every fan-out must be an integer >= 1")
            N = len(branching)
            nodes = [math.prod(branching[: N - n]) for n in range(N + 1)]
            fanout = (0, *reversed(list(branching)))
            return cls(tuple(nodes), fanout, fanout)
        counts: dict[int, int] = {}
        most: dict[int, int] = {}
        least: dict[int, int] = {}

        def walk(x: Any, path: str) -> int:  # the layer of x; the spec is small next to the tree it describes
            _check_spec_node(x, path)
            if isinstance(x, int):
                counts[0] = counts.get(0, 0) + x
                counts[1] = counts.get(1, 0) + 1
                most[1] = max(most.get(1, 0), x)
                least[1] = min(least.get(1, x), x)
                return 1
            layer = _same_depth({walk(c, f"{path}[{i}]") for i, c in enumerate(x)}, path) + 1
            counts[layer] = counts.get(layer, 0) + 1
            most[layer] = max(most.get(layer, 0), len(x))
            least[layer] = min(least.get(layer, len(x)), len(x))
            return layer

        N = walk(nested, "")
        return cls(tuple(counts[n] for n in range(N + 1)), (0, *(most[n] for n in range(1, N + 1))),
                   (0, *(least[n] for n in range(1, N + 1))))


def aggregations_per_round(tau: Sequence[int], n: int) -> int:
    """How often a layer-``n`` node aggregates per global round: ``prod(tau_{n+1..N})``."""
    return math.prod(tau[n:])


def messages_per_round(tree: Tree, tau: Sequence[int], n: int) -> int:
    """Uplink messages crossing link ``n`` (layer n-1 -> n) in one global round."""
    return tree.num_nodes(n - 1) * aggregations_per_round(tau, n)


# ---- device -> rank mapping ----------------------------------------------
def _split_groups(sizes: np.ndarray, p: int) -> list[int]:
    """Cut ``len(sizes) >= p`` consecutive items into ``p`` groups of near-equal sum;
    returns the end index (exclusive) of each group."""
    k = len(sizes)
    cum = np.cumsum(sizes)
    total = cum[-1]
    ends: list[int] = []
    prev = 0
    for j in range(1, p):
        lo, hi = prev + 1, k - (p - j)  # group j must leave one item per later group
        target = total * j / p
        cand = np.arange(lo, hi + 1)
        best = int(cand[np.argmin(np.abs(cum[cand - 1] - target))])
        ends.append(best)
        prev = best
    ends.append(k)
    return ends


def _share_ranks(sizes: np.ndarray, p: int) -> list[int]:
    """Give ``p > len(sizes)`` ranks to children, 1 <= share_i <= sizes_i, ~ proportional."""
    total = sizes.sum()
    share = np.clip(np.floor(p * sizes / total).astype(np.int64), 1, sizes)
    while share.sum() < p:
        load = np.where(share < sizes, sizes / share, -1.0)
        share[int(np.argmax(load))] += 1
    while share.sum() > p:
        load = np.where(share > 1, sizes / (share - 1), np.inf)
        share[int(np.argmin(load))] -= 1
    return [int(s) for s in share]


def rank_blocks(tree: Tree, num_ranks: int) -> np.ndarray:
    """Device boundaries of the ranks' blocks (length ``num_ranks + 1``).

    Rank ``r`` hosts devices ``b[r] .. b[r+1]-1``.  The blocks are aligned with
    the tree at every layer (a rank lies inside one node, or a node inside one
    rank) and as balanced as that allows.  Raises :class:`TopologyError` when
    ``num_ranks`` cannot host the tree.
    """
    D = tree.num_devices
    if not 1 <= num_ranks <= D:
        raise TopologyError(
            f"{num_ranks} MPI ranks cannot host a tree of {D} devices: every rank needs at least one "
            f"device. Use 1..{D} ranks; these give every rank the same number of devices: "
            f"{balanced_rank_counts(tree)}"
        )
    ends: list[int] = []

    def assign(n: int, u: int, p: int) -> None:
        if p == 1:
            ends.append(int(tree.starts[n][u + 1]))
            return
        kids = tree.children(n, u)
        sizes = np.diff(tree.starts[n - 1][kids.start : kids.stop + 1])
        if p <= len(kids):
            for e in _split_groups(sizes, p):
                ends.append(int(tree.starts[n - 1][kids.start + e]))
        else:
            for c, share in zip(kids, _share_ranks(sizes, p)):
                assign(n - 1, c, share)

    assign(tree.N, 0, num_ranks)
    bounds = np.asarray([0] + ends, dtype=np.int64)
    check_aligned(tree, bounds)
    return bounds


def _misalignment(tree: Tree, bounds: np.ndarray) -> str | None:
    """What is wrong with the blocks ``bounds``, or ``None`` if they are aligned."""
    for n in range(tree.N + 1):
        st = tree.starts[n]
        for r in range(len(bounds) - 1):
            a, b = int(bounds[r]), int(bounds[r + 1])
            if b <= a:
                return f"rank {r} would host no device (block {a}..{b})"
            i = int(np.searchsorted(st, a, side="right") - 1)
            j = int(np.searchsorted(st, b - 1, side="right") - 1)
            if i != j and (st[i] != a or st[j + 1] != b):
                return f"rank {r}'s devices {a}..{b - 1} straddle nodes of layer {n}"
    return None


def check_aligned(tree: Tree, bounds: np.ndarray) -> None:
    """Raise :class:`TopologyError` unless every block is inside one node or is a
    union of whole nodes, at every layer."""
    problem = _misalignment(tree, bounds)
    if problem is not None:
        raise TopologyError(f"{problem}; rank counts that fit this tree evenly: {balanced_rank_counts(tree)}")


def balanced_rank_counts(tree: Tree, limit: int = 24) -> list[int]:
    """Rank counts (divisors of the device count) that give every rank the same
    number of devices with aligned blocks."""
    D = tree.num_devices
    good = []
    for p in range(1, D + 1):
        if D % p:
            continue
        if _misalignment(tree, np.arange(0, D + 1, D // p)) is not None:
            continue
        good.append(p)
        if len(good) >= limit:
            break
    return good


@dataclass(frozen=True, eq=False)
class RankLayout:
    """Which rank hosts which devices, and who leads which node."""

    tree: Tree
    bounds: np.ndarray

    @classmethod
    def build(cls, tree: Tree, num_ranks: int) -> RankLayout:
        return cls(tree, rank_blocks(tree, num_ranks))

    @property
    def num_ranks(self) -> int:
        return len(self.bounds) - 1

    def devices(self, rank: int) -> range:
        return range(int(self.bounds[rank]), int(self.bounds[rank + 1]))

    def rank_of_device(self, device: int) -> int:
        return int(np.searchsorted(self.bounds, device, side="right") - 1)

    def leader(self, n: int, u: int) -> int:
        """Rank that leads node ``u`` of layer ``n``: the host of its first device."""
        return self.rank_of_device(int(self.tree.starts[n][u]))

    def ranks_of(self, n: int, u: int) -> range:
        r = self.tree.device_range(n, u)
        return range(self.rank_of_device(r.start), self.rank_of_device(r.stop - 1) + 1)

    def nodes_of(self, rank: int, n: int) -> range:
        """Nodes of layer ``n`` that share at least one device with ``rank``."""
        dev = self.devices(rank)
        return range(self.tree.node_of_device(n, dev.start), self.tree.node_of_device(n, dev.stop - 1) + 1)

    def spanning_node(self, rank: int, n: int) -> int | None:
        """The node of layer ``n`` that contains ``rank`` and spans several ranks, if any."""
        nodes = self.nodes_of(rank, n)
        if len(nodes) != 1:
            return None
        u = nodes.start
        return u if len(self.ranks_of(n, u)) > 1 else None

    def load_imbalance(self) -> float:
        """max/mean devices per rank (1.0 is perfect)."""
        sizes = np.diff(self.bounds)
        return float(sizes.max() / sizes.mean())
