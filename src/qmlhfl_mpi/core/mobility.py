"""Devices that move between edge servers (pure): the tree of the moment, round after round.

A model turns round ``t - 1``'s edge of every device into round ``t``'s; round 0 is the tree's own
(:meth:`~.membership.Membership.of_tree`), but for a trace's round-0 rows.  Every random choice is counter-based, keyed
``(seed, MOBILITY, round)`` at counters ``2d`` (whether device ``d`` moves) and ``2d + 1`` (where to), so
a round's moves are the same on every rank and cost a few vectorised operations per device.

* ``static``: nobody moves.
* ``random(p, neighbours)``: each device moves with probability ``p``; ``uniform`` to any other edge
  (uniformly), ``ring`` to the edge before or after it (edges in id order, wrapping), ``grid`` to one of its
  neighbours (up, down, left, right) on a grid of ``ceil(sqrt(E))`` columns filled row by row.
* ``markov(matrix)``: edge ``i``'s row of an ``E x E`` transition matrix (rows sum to 1) gives the
  probabilities of being under each edge next round.
* ``trace(rows)``: ``(round, device, edge)`` rows; a device sits under its row's edge from that round on (edge
  ``-1``: it sits out).  ``/topology/parents`` of a results file is such a trace.

:class:`Mobility` (the config's ``mobility:`` and ``failures:``) keeps the last round it computed, so a run
stepping through its rounds pays one step per round; edge servers that are down
(:class:`~.failures.EdgeFailures`) are a view applied on top of each round's edges, not a move.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from . import rng
from .codecs.stream import key_words, uniforms_at
from .failures import EdgeFailures
from .membership import Membership
from .topology import Tree

__all__ = ["MarkovMoves", "Mobility", "MobilityModel", "RandomMoves", "Static", "TraceMoves"]

NEIGHBOURS = ("uniform", "ring", "grid")
MODELS = ("static", "random", "markov", "trace")


class MobilityModel(ABC):
    """One step of the tree of the moment."""

    @abstractmethod
    def step(self, edge_of: np.ndarray, round_: int, num_edges: int) -> np.ndarray:
        """Round ``round_``'s edge of every device from round ``round_ - 1``'s ``edge_of`` (not modified)."""

    def start(self, edge_of: np.ndarray, num_edges: int) -> np.ndarray:
        """Round 0's edges from the tree's (its own, but for a trace's round-0 rows)."""
        return edge_of


class Static(MobilityModel):
    def step(self, edge_of: np.ndarray, round_: int, num_edges: int) -> np.ndarray:
        return edge_of


def _draws(seed: int, round_: int, devices: np.ndarray, which: int) -> np.ndarray:
    """A uniform in (0, 1) per device of ``devices``: whether it moves (``which`` 0: counter ``2d``) or where to
    (1: counter ``2d + 1``); counter-based, so drawing some devices' gives the same numbers as drawing all."""
    k0, k1 = key_words((seed, rng.MOBILITY, round_))
    half = 2.0 ** -25  # the 24-bit draws moved to the middle of their cells: in (0, 1)
    return uniforms_at(k0, k1, 2 * np.asarray(devices, dtype=np.int64) + which).astype(np.float64) + half


class RandomMoves(MobilityModel):
    """With probability ``p`` a device moves to another edge: any (``uniform``), next to it on a ring of the
    edges (``ring``) or on a grid (``grid``)."""

    def __init__(self, p: float, neighbours: str, seed: int) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"mobility p = {p!r}: expected a probability in [0, 1]")
        if neighbours not in NEIGHBOURS:
            raise ValueError(f"mobility neighbours = {neighbours!r}: expected one of {', '.join(NEIGHBOURS)}")
        self.p, self.neighbours, self.seed = p, neighbours, seed

    def step(self, edge_of: np.ndarray, round_: int, num_edges: int) -> np.ndarray:
        if self.p == 0 or num_edges < 2:
            return edge_of
        move = _draws(self.seed, round_, np.arange(edge_of.size), 0)
        out = edge_of.copy()
        m = np.flatnonzero((move < self.p) & (edge_of >= 0))  # where to: drawn for the movers only
        cur, w = edge_of[m], _draws(self.seed, round_, m, 1)
        if self.neighbours == "uniform":  # one of the other E - 1 edges
            k = np.minimum((w * (num_edges - 1)).astype(np.int64), num_edges - 2)
            out[m] = k + (k >= cur)
        elif self.neighbours == "ring":
            out[m] = (cur + np.where(w < 0.5, -1, 1)) % num_edges
        else:
            out[m] = _grid_step(cur, w, num_edges)
        return out


def _grid_step(cur: np.ndarray, w: np.ndarray, num_edges: int) -> np.ndarray:
    """A uniformly drawn neighbour (up, down, left, right, those that exist) on a grid of ``ceil(sqrt(E))``
    columns, edges numbered row by row."""
    cols = math.ceil(math.sqrt(num_edges))
    col = cur % cols
    cand = np.stack([cur - cols, cur + cols, np.where(col > 0, cur - 1, -1), np.where(col < cols - 1, cur + 1, -1)],
                    axis=1)
    cand[(cand < 0) | (cand >= num_edges)] = -1
    valid = cand >= 0
    count = valid.sum(axis=1)
    pick = np.minimum((w * count).astype(np.int64), count - 1)
    order = np.argsort(~valid, axis=1, kind="stable")  # the valid neighbours first, in (up, down, left, right)
    chosen = cand[np.arange(cur.size), order[np.arange(cur.size), pick]]
    return np.where(count > 0, chosen, cur)


class MarkovMoves(MobilityModel):
    """Next round's edge drawn from row ``edge`` of a transition matrix."""

    def __init__(self, matrix: np.ndarray, seed: int) -> None:
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
            raise ValueError(f"mobility matrix of shape {m.shape}: expected a square matrix, one row and column "
                             "per edge server")
        if not np.isfinite(m).all() or (m < 0).any():
            raise ValueError("mobility matrix: every entry must be a finite probability >= 0")
        sums = m.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1) > 1e-9)
        if bad.size:
            raise ValueError(f"mobility matrix: row {int(bad[0])} sums to {sums[bad[0]]:.6g}; every row must sum to 1")
        self.cum, self.seed = np.cumsum(m, axis=1), seed

    def step(self, edge_of: np.ndarray, round_: int, num_edges: int) -> np.ndarray:
        if self.cum.shape[0] != num_edges:
            raise ValueError(f"mobility matrix has {self.cum.shape[0]} rows but the tree has {num_edges} edge servers")
        out = edge_of.copy()
        now = Membership(edge_of, num_edges)
        for e in range(num_edges):  # per edge: the entries of its row below each of its devices' draws
            devs = now.members(e)
            if devs.size:  # searchsorted = (cum[e] < w).sum(): the row rises
                new = np.searchsorted(self.cum[e], _draws(self.seed, round_, devs, 1), side="left")
                out[devs] = np.minimum(new, num_edges - 1)
        return out


class TraceMoves(MobilityModel):
    """``(round, device, edge)`` rows: from that round on the device sits under that edge."""

    def __init__(self, rows: Sequence[tuple[int, int, int]] | np.ndarray, num_devices: int, num_edges: int) -> None:
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        big = np.iinfo(np.int64).max
        for col, (name, lo, hi) in enumerate((("round", 0, big), ("device", 0, num_devices),
                                              ("edge", -1, num_edges))):
            vals = table[:, col]
            wrong = (vals < lo) | (vals >= hi)
            if wrong.any():
                valid = ">= 0" if hi == big else f"0..{hi - 1}" + (" or -1 (sits out)" if lo < 0 else "")
                raise ValueError(f"mobility trace: {name} {int(vals[wrong][0])} out of range (valid: {valid})")
        order = np.lexsort((table[:, 1], table[:, 0]))
        self.table = table[order]

    def start(self, edge_of: np.ndarray, num_edges: int) -> np.ndarray:
        return self.step(edge_of, 0, num_edges)

    def step(self, edge_of: np.ndarray, round_: int, num_edges: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.table[:, 0], [round_, round_ + 1])
        if lo == hi:
            return edge_of
        out = edge_of.copy()
        out[self.table[lo:hi, 1]] = self.table[lo:hi, 2]  # a device listed twice in a round: its last row
        return out


class Mobility:
    """The tree of the moment of every round under ``model`` (round 0: the tree's own), with the edge servers
    that are down (``failures``) left empty."""

    def __init__(self, tree: Tree, model: MobilityModel, failures: EdgeFailures | None = None) -> None:
        self.tree, self.model, self.failures = tree, model, failures
        self._round, self._edges = 0, self._first()

    def _first(self) -> np.ndarray:
        return self.model.start(Membership.of_tree(self.tree).edge_of, self.tree.num_nodes(1))

    @property
    def dynamic(self) -> bool:
        """Whether any round's tree can differ from the tree's own."""
        return not isinstance(self.model, Static) or bool(self.failures)

    def at(self, round_: int, t0: float = 0.0) -> Membership:
        """Round ``round_``'s membership (stepping on from the last round asked for, or from round 0); the
        round starts at virtual time ``t0`` (failures counted in seconds)."""
        if round_ < self._round:
            self._round, self._edges = 0, self._first()
        E = self.tree.num_nodes(1)
        while self._round < round_:
            self._round += 1
            self._edges = self.model.step(self._edges, self._round, E)
        edges = self.failures.apply(self._edges, round_, t0) if self.failures else self._edges
        return Membership(edges, E)
