"""Nested aggregation: one global round of QMLHFL on one rank.

Implements DESIGN section 1's recursion over the communicators of
:mod:`.communicators` and the codecs of :mod:`qmlhfl_mpi.core.codecs`::

    aggregate(u, v) = v + sum_c a(c) * Q_n(work(c, v) - v)

Every child's difference is encoded by the rank that leads the child, the
packed messages go up point to point (or stay on the rank when the node
lies inside it), and the parent's leader decodes them in child order.  The
same encode/decode path serves local and remote children, which is why the
trained model is bit-for-bit the same for any number of ranks.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from ..core import rng
from ..core.codecs import Codec
from ..core.topology import RankLayout
from .collectives import broadcast_vector, post_receives, send_messages, wait
from .communicators import LayerComms

# (vector, device, round, call) -> (trained vector, sum of step losses, steps)
TrainFn = Callable[[np.ndarray, int, int, int], tuple[np.ndarray, float, int]]
# (vector, devices, round, calls, all devices of their layer-1 node) -> [(trained vector, sum of step losses,
# steps)] for devices trained together
TrainManyFn = Callable[[np.ndarray, Sequence[int], int, Sequence[int], range], list[tuple[np.ndarray, float, int]]]


@dataclass
class RoundStats:
    """What one rank did in one global round.  Losses and steps are kept per
    device, so that summing them over ranks (each entry comes from one rank) and
    then over devices gives the same float for any number of ranks."""

    num_links: int
    num_devices: int
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))   # sum of step losses per device
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # SGD steps per device
    uplink_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    t_compute: float = 0.0
    t_codec: float = 0.0
    t_comm: float = 0.0

    def __post_init__(self) -> None:
        self.loss = np.zeros(self.num_devices)
        self.steps = np.zeros(self.num_devices)
        self.uplink_bytes = np.zeros(self.num_links, dtype=np.int64)


class HierarchicalAggregator:
    """Runs global rounds for one rank.  :meth:`global_round` is collective over
    the communicators in ``comms`` (built from the same layout on every rank)."""

    def __init__(self, layout: RankLayout, rank: int, comms: Sequence[LayerComms | None],
                 codecs: Sequence[Codec], tau: Sequence[int], dim: int, seed: int,
                 train_fn: TrainFn, samples: np.ndarray | None = None,
                 train_many_fn: TrainManyFn | None = None) -> None:
        tree = layout.tree
        if len(codecs) != tree.N or len(tau) != tree.N:
            raise ValueError(f"need {tree.N} codecs and tau values, got {len(codecs)} and {len(tau)}")
        self.layout, self.tree, self.rank = layout, tree, rank
        self.comms, self.codecs, self.tau = list(comms), list(codecs), list(tau)
        self.dim, self.seed, self.train_fn, self.train_many_fn = dim, seed, train_fn, train_many_fn
        self.samples = samples
        self.msg_len = [c.nbytes(dim) for c in codecs]
        self._weights: dict[tuple[int, int], np.ndarray] = {}
        self._calls: dict[tuple[int, int], int] = {}
        self._round = 0
        self.stats = RoundStats(tree.N, tree.num_devices)

    # ---- helpers -----------------------------------------------------------
    def weights(self, n: int, u: int) -> np.ndarray:
        key = (n, u)
        if key not in self._weights:
            self._weights[key] = self.tree.weights(n, u, self.samples).astype(np.float32)
        return self._weights[key]

    def _next_call(self, n: int, u: int) -> int:
        k = self._calls.get((n, u), 0)
        self._calls[(n, u)] = k + 1
        return k

    def _my_children(self, n: int, u: int) -> range:
        kids = self.tree.children(n, u)
        mine = self.layout.nodes_of(self.rank, n - 1)
        return range(max(kids.start, mine.start), min(kids.stop, mine.stop))

    # ---- the recursion ------------------------------------------------------
    def global_round(self, t: int, w: np.ndarray) -> np.ndarray:
        """One cloud aggregation ``w_{t+1} = aggregate(cloud, w_t)``; every rank
        returns the new cloud model.  Collective."""
        self._round = t
        self._calls.clear()
        self.stats = RoundStats(self.tree.N, self.tree.num_devices)
        out = self._aggregate(self.tree.N, 0, np.asarray(w, dtype=np.float32), broadcast=True)
        assert out is not None
        return out

    def _work(self, m: int, c: int, v: np.ndarray | None) -> np.ndarray | None:
        """What child ``c`` (layer ``m``) hands its parent, started from ``v``."""
        if m == 0:
            assert v is not None  # a device always trains from a model
            t0 = time.perf_counter()
            x, loss_sum, steps = self.train_fn(v, c, self._round, self._next_call(0, c))
            self.stats.t_compute += time.perf_counter() - t0
            self.stats.loss[c] += loss_sum
            self.stats.steps[c] += steps
            return x
        reps = self.tau[m]  # tau_{m+1}
        y: np.ndarray | None = v
        for k in range(reps):
            # the last result only matters to c's leader: the parent broadcasts next
            y = self._aggregate(m, c, y, broadcast=k < reps - 1)
        return y

    def _train_together(self, u: int, kids: range, v: np.ndarray | None) -> list[np.ndarray]:
        """The local device children of layer-1 node ``u``, trained in batched calls."""
        assert v is not None and self.train_many_fn is not None
        calls = [self._next_call(0, c) for c in kids]
        t0 = time.perf_counter()
        results = self.train_many_fn(v, list(kids), self._round, calls, self.tree.device_range(1, u))
        self.stats.t_compute += time.perf_counter() - t0
        for c, (_, loss_sum, steps) in zip(kids, results):
            self.stats.loss[c] += loss_sum
            self.stats.steps[c] += steps
        return [x for x, _, _ in results]

    def _aggregate(self, n: int, u: int, v: np.ndarray | None, broadcast: bool) -> np.ndarray | None:
        """One aggregation of node ``u`` (layer ``n``) from its current model ``v``."""
        layout, rank, st = self.layout, self.rank, self.stats
        codec, L = self.codecs[n - 1], self.msg_len[n - 1]
        lc = self.comms[n]
        spanning = lc is not None and lc.node == u
        leaders = lc.leaders if spanning and lc is not None else None
        leads_u = layout.leader(n, u) == rank
        remote: list[tuple[np.ndarray, MPI.Request]] = []
        acc = np.zeros(self.dim, dtype=np.float32) if leads_u else None
        weights = self.weights(n, u) if leads_u else None
        if leads_u and leaders is not None:  # posted first: the other ranks' messages arrive while we work
            assert lc is not None and lc.leader_counts is not None  # set for every member of ``leaders``
            remote = post_receives(leaders, lc.leader_counts, L, tag=n)
        parts: list[np.ndarray] = []
        kids = self._my_children(n, u)
        trained = self._train_together(u, kids, v) if n == 1 and self.train_many_fn is not None else None
        for i, c in enumerate(kids):
            x = trained[i] if trained is not None else self._work(n - 1, c, v)
            if layout.leader(n - 1, c) != rank:
                continue
            assert x is not None and v is not None
            key = (self.seed, rng.QUANT, n, c, self._round, self._next_call(n, c))
            t0 = time.perf_counter()
            if acc is not None and weights is not None:  # u's own children come first in child order
                codec.encode_add(x, v, key, weights[i], acc)  # = decode_add(encode(...)), bit for bit
                if remote:
                    MPI.Request.Testall([r for _, r in remote])  # let MPI progress the transfers
            else:
                parts.append(codec.encode(x, v, key))
            st.t_codec += time.perf_counter() - t0
            st.uplink_bytes[n - 1] += L
        if leaders is not None and not leads_u:  # a child's leader that does not lead u: send and go on
            t0 = time.perf_counter()
            send_messages(leaders, parts, tag=n)
            st.t_comm += time.perf_counter() - t0
        new = None
        if acc is not None and weights is not None:
            assert v is not None
            first = len(weights) - len(remote)
            for i, (msg, req) in enumerate(remote, start=first):  # the others' children, in child order
                t0 = time.perf_counter()
                wait(req)
                t1 = time.perf_counter()
                codec.decode_add(msg, weights[i], acc)
                st.t_comm += t1 - t0
                st.t_codec += time.perf_counter() - t1
            t0 = time.perf_counter()
            new = v + acc
            st.t_codec += time.perf_counter() - t0
        if broadcast and spanning and lc is not None and lc.subtree is not None:
            t0 = time.perf_counter()
            new = broadcast_vector(lc.subtree, new, self.dim)
            st.t_comm += time.perf_counter() - t0
        return new
