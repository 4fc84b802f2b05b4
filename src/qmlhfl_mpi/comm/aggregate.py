"""Nested aggregation: one global round of QMLHFL on one rank.

Implements DESIGN section 1's recursion over the communicators of
:mod:`.communicators` and the codecs of :mod:`qmlhfl_mpi.core.codecs`::

    aggregate(u, v) = opt_u(v, sum_{c in P} a(c) * Q_n(work(c, v) - v + e_c))

with the participants ``P`` of :mod:`qmlhfl_mpi.core.participation` (all
children by default), the server optimiser ``opt_u`` of
:mod:`qmlhfl_mpi.core.server_opt` (``v + g`` by default) and the error-feedback
residual ``e_c`` of the sender (zero unless ``quantizer.error_feedback``).
When the node's model then goes down to its subtree and the link has a
downlink codec, the subtree (the node included) adopts ``v + Q(new - v)``.

Every child's message is encoded by the rank that leads the child, the
packed messages go up point to point (or stay on the rank when the node
lies inside it), and the parent's leader decodes them in child order.  The
same encode/decode path serves local and remote children, and every random
choice (which children take part, the quantizers' draws) comes from keys
every rank computes alike, which is why the trained model is bit-for-bit the
same for any number of ranks.

The model vectors (children's results, accumulators, residuals, server
state) are those of the :class:`~qmlhfl_mpi.core.vectors.Vectors` backend the
aggregator is given: numpy arrays on the host by default, or tensors on the
training device, whose codecs hand over host bytes; MPI only ever moves host
bytes, and :meth:`HierarchicalAggregator.global_round` takes and returns the
cloud model as a host array.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from ..core import rng
from ..core.codecs import Codec
from ..core.links import LinkOptions
from ..core.participation import Participation
from ..core.server_opt import Average, ServerOptimizer
from ..core.topology import RankLayout
from ..core.vectors import HostVectors, LinkCodec, Vectors, through_host
from .collectives import broadcast_bytes, broadcast_vector, post_receives, send_messages, wait
from .communicators import LayerComms
from .watchdog import Watchdog

# Vectors of the aggregator's backend (numpy arrays, or tensors of the torch backend).
Vec = Any
# (vector, device, round, call) -> (trained vector, sum of step losses, steps)
TrainFn = Callable[[Vec, int, int, int], tuple[Vec, float, int]]
# (vector, devices, round, calls, all devices of their layer-1 node) -> [(trained vector, sum of step losses,
# steps)] for devices trained together
TrainManyFn = Callable[[Vec, Sequence[int], int, Sequence[int], range], list[tuple[Vec, float, int]]]


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
    messages: np.ndarray = field(default_factory=lambda: np.zeros(0))        # uplink messages per link
    downlink_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per link, see _downlink
    t_compute: float = 0.0
    t_codec: float = 0.0
    t_comm: float = 0.0

    def __post_init__(self) -> None:
        self.loss = np.zeros(self.num_devices)
        self.steps = np.zeros(self.num_devices)
        self.uplink_bytes = np.zeros(self.num_links, dtype=np.int64)
        self.messages = np.zeros(self.num_links, dtype=np.int64)
        self.downlink_bytes = np.zeros(self.num_links, dtype=np.int64)


class HierarchicalAggregator:
    """Runs global rounds for one rank.  :meth:`global_round` is collective over
    the communicators in ``comms`` (built from the same layout on every rank).
    ``vectors`` is the backend of the model vectors (:class:`HostVectors` by default);
    ``train_fn`` and ``train_many_fn`` take and return vectors of that backend."""

    def __init__(self, layout: RankLayout, rank: int, comms: Sequence[LayerComms | None],
                 codecs: Sequence[Codec], tau: Sequence[int], dim: int, seed: int,
                 train_fn: TrainFn, samples: np.ndarray | None = None,
                 train_many_fn: TrainManyFn | None = None, options: LinkOptions | None = None,
                 vectors: Vectors | None = None) -> None:
        tree = layout.tree
        if len(codecs) != tree.N or len(tau) != tree.N:
            raise ValueError(f"need {tree.N} codecs and tau values, got {len(codecs)} and {len(tau)}")
        opts = options or LinkOptions()
        self.layout, self.tree, self.rank = layout, tree, rank
        self.comms, self.codecs, self.tau = list(comms), list(codecs), list(tau)
        self.dim, self.seed, self.train_fn, self.train_many_fn = dim, seed, train_fn, train_many_fn
        self.samples = samples
        self.msg_len = [c.nbytes(dim) for c in codecs]
        self.participation = opts.participation or Participation.full(tree.N)
        self.server: list[ServerOptimizer] = list(opts.server) or [Average() for _ in range(tree.N)]
        self.error_feedback = list(opts.error_feedback) or [False] * tree.N
        self.downlink: list[Codec | None] = list(opts.downlink) or [None] * tree.N
        for name, vals in (("server optimizers", self.server), ("error_feedback", self.error_feedback),
                           ("downlink", self.downlink)):
            if len(vals) != tree.N:
                raise ValueError(f"need {tree.N} {name}, got {len(vals)}")
        self.down_len = [4 * dim if c is None else c.nbytes(dim) for c in self.downlink]
        self.vectors: Vectors = HostVectors() if vectors is None else vectors
        # the codecs' implementations for the backend's vectors (the codecs themselves on the host)
        self._up: list[LinkCodec] = [self.vectors.link_codec(c) for c in self.codecs]
        self._down: list[LinkCodec | None] = [None if c is None else self.vectors.link_codec(c)
                                              for c in self.downlink]
        self._weights: dict[tuple[int, int], np.ndarray] = {}
        self._calls: dict[tuple[int, int], int] = {}
        self._agg_calls: dict[tuple[int, int], int] = {}
        self._round = 0
        self._zero: Vec | None = None
        # per-node state kept on the node's (or the sender's) leader; see state()/load_state()
        self.server_state: dict[tuple[int, int], dict[str, Vec]] = {}
        self.residuals: dict[tuple[int, int], Vec] = {}
        self.stats = RoundStats(tree.N, tree.num_devices)
        self.guard: Watchdog | None = None  # the round deadline enforced in every wait (train.round_timeout)

    # ---- helpers -----------------------------------------------------------
    def weights(self, n: int, u: int, chosen: np.ndarray | None = None) -> np.ndarray:
        """Float32 weights of the children of ``u`` at positions ``chosen`` (all by default)."""
        if chosen is None or self.participation.layer_is_full(n):
            key = (n, u)
            if key not in self._weights:
                self._weights[key] = self.tree.weights(n, u, self.samples).astype(np.float32)
            return self._weights[key]
        if len(chosen) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.participation.weights(n, self.tree.child_sizes(n, u, self.samples), chosen)

    def links_through_host(self) -> list[str]:
        """The links whose codec moves float vectors through the host on this backend (none on the host)."""
        out = [f"uplink {n} ({self.codecs[n - 1].name})" for n, c in enumerate(self._up, 1)
               if through_host(c, self.dim)]
        out += [f"downlink {n} ({c.name})" for n, (c, dc) in enumerate(zip(self.downlink, self._down), 1)
                if c is not None and dc is not None and through_host(dc, self.dim)]
        return out

    def _next_call(self, n: int, u: int) -> int:
        k = self._calls.get((n, u), 0)
        self._calls[(n, u)] = k + 1
        return k

    def _my_children(self, n: int, u: int) -> range:
        kids = self.tree.children(n, u)
        mine = self.layout.nodes_of(self.rank, n - 1)
        return range(max(kids.start, mine.start), min(kids.stop, mine.stop))

    def _participants(self, n: int, u: int) -> np.ndarray:
        """Positions of the children of ``u`` taking part in its next aggregation (every rank alike)."""
        k = self._agg_calls.get((n, u), 0)
        self._agg_calls[(n, u)] = k + 1
        C = len(self.tree.children(n, u))
        if self.participation.layer_is_full(n):
            return np.arange(C, dtype=np.int64)
        return self.participation.participants(self.seed, n, u, self._round, k, C)

    # ---- per-node state (server optimisers, error feedback) -----------------
    def state(self) -> dict[str, np.ndarray]:
        """The per-node state this rank keeps, by name (``server.n.u.name``, ``residual.n.c``), as host arrays."""
        host = self.vectors.to_host
        out = {f"server.{n}.{u}.{k}": host(a) for (n, u), st in self.server_state.items() for k, a in st.items()}
        out.update({f"residual.{n}.{c}": host(e) for (n, c), e in self.residuals.items()})
        return out

    def state_vectors(self) -> int:
        """How many float32 vectors of the model's length the per-node state may hold (all ranks together)."""
        tree = self.tree
        out = 0
        for n in range(1, tree.N + 1):
            if not isinstance(self.server[n - 1], Average):
                out += tree.num_nodes(n) * len(self.server[n - 1].state_names)
            if self.error_feedback[n - 1]:
                out += tree.num_nodes(n - 1)
        return out

    def owner(self, name: str) -> int:
        """The rank that keeps the state entry ``name`` (of :meth:`state`) in this layout."""
        kind, n, u = name.split(".")[:3]
        return self.layout.leader(int(n), int(u)) if kind == "server" else self.layout.leader(int(n) - 1, int(u))

    def load_state(self, entries: dict[str, np.ndarray]) -> None:
        """Take over the entries of :meth:`state` that this rank keeps (after a resume)."""
        for name, arr in entries.items():
            if self.owner(name) != self.rank:
                continue
            parts = name.split(".")
            vec = np.array(arr, dtype=np.float32).reshape(-1)
            if vec.size != self.dim:
                raise ValueError(f"checkpoint state {name!r} has {vec.size} values, the model {self.dim}")
            if parts[0] == "server":
                self.server_state.setdefault((int(parts[1]), int(parts[2])), {})[parts[3]] = self.vectors.from_host(vec)
            elif parts[0] == "residual":
                self.residuals[(int(parts[1]), int(parts[2]))] = self.vectors.from_host(vec)
            else:
                raise ValueError(f"checkpoint state {name!r} is of no known kind (server., residual.)")

    # ---- the recursion ------------------------------------------------------
    def global_round(self, t: int, w: np.ndarray) -> np.ndarray:
        """One cloud aggregation ``w_{t+1} = aggregate(cloud, w_t)``; every rank
        returns the new cloud model.  Collective."""
        self._round = t
        self._calls.clear()
        self._agg_calls.clear()
        self.stats = RoundStats(self.tree.N, self.tree.num_devices)
        out = self._aggregate(self.tree.N, 0, self.vectors.from_host(w), broadcast=True)
        assert out is not None
        return self.vectors.to_host(out)

    def _work(self, m: int, c: int, v: Vec | None) -> Vec | None:
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
        y: Vec | None = v
        for k in range(reps):
            # the last result only matters to c's leader: the parent broadcasts next
            y = self._aggregate(m, c, y, broadcast=k < reps - 1)
        return y

    def _train_together(self, u: int, kids: Sequence[int], v: Vec | None) -> list[Vec]:
        """The local device children ``kids`` of layer-1 node ``u``, trained in batched calls."""
        assert v is not None and self.train_many_fn is not None
        calls = [self._next_call(0, c) for c in kids]
        t0 = time.perf_counter()
        results = self.train_many_fn(v, list(kids), self._round, calls, self.tree.device_range(1, u))
        self.stats.t_compute += time.perf_counter() - t0
        for c, (_, loss_sum, steps) in zip(kids, results):
            self.stats.loss[c] += loss_sum
            self.stats.steps[c] += steps
        return [x for x, _, _ in results]

    def _encode(self, n: int, c: int, x: Vec, v: Vec, a: np.float32 | None,
                acc: Vec | None) -> np.ndarray | None:
        """Child ``c``'s message to its parent (``acc += a * decoded`` instead when ``acc`` is given)."""
        codec = self._up[n - 1]
        key = (self.seed, rng.QUANT, n, c, self._round, self._next_call(n, c))
        if self.error_feedback[n - 1]:  # m = Q(x - v + e), e <- x - v + e - decode(m)
            e = self.residuals.get((n, c))
            z = x - v
            if e is not None:
                z += e
            if self._zero is None:
                self._zero = self.vectors.zeros(self.dim)
            msg = codec.encode(z, self._zero, key)
            z -= codec.decode(msg, self.dim)
            self.residuals[(n, c)] = z
            if acc is not None:
                assert a is not None
                codec.decode_add(msg, a, acc)
                return None
            return msg
        if acc is not None:
            assert a is not None
            codec.encode_add(x, v, key, a, acc)  # = decode_add(encode(...)), bit for bit
            return None
        return codec.encode(x, v, key)

    def _update(self, n: int, u: int, v: Vec, g: Vec) -> Vec:
        """The node's optimiser applied to the decoded update ``g``."""
        opt = self.server[n - 1]
        if isinstance(opt, Average):
            return v + g
        st = self.server_state.get((n, u))
        if st is None:
            st = self.server_state[(n, u)] = {k: self.vectors.from_host(a)
                                              for k, a in opt.init_state(self.dim).items()}
        return opt.apply(v, g, st)

    def _downlink(self, n: int, u: int, v: Vec, new: Vec | None, spanning: bool,
                  lc: LayerComms | None, leads_u: bool) -> Vec:
        """Send node ``u``'s new model down to its subtree; every member returns the same vector.

        Counted on link ``n``: one message of :attr:`down_len` bytes per child of ``u``."""
        st, codec = self.stats, self._down[n - 1]
        if leads_u:
            st.downlink_bytes[n - 1] += self.down_len[n - 1] * len(self.tree.children(n, u))
        if codec is None:
            if spanning and lc is not None and lc.subtree is not None:
                t0 = time.perf_counter()
                vec = self.vectors
                got = broadcast_vector(lc.subtree, None if new is None else vec.to_host(new), self.dim, self.guard)
                new = new if new is not None else vec.from_host(got)  # the root keeps its own vector
                st.t_comm += time.perf_counter() - t0
            assert new is not None
            return new
        t0 = time.perf_counter()
        msg = None
        if leads_u:
            assert new is not None
            msg = codec.encode(new, v, (self.seed, rng.DOWN, n, u, self._round, self._agg_calls[(n, u)] - 1))
        st.t_codec += time.perf_counter() - t0
        if spanning and lc is not None and lc.subtree is not None:
            t0 = time.perf_counter()
            msg = broadcast_bytes(lc.subtree, msg, self.down_len[n - 1], self.guard)
            st.t_comm += time.perf_counter() - t0
        assert msg is not None
        t0 = time.perf_counter()
        out = self.vectors.copy(v)
        codec.decode_add(msg, np.float32(1), out)
        st.t_codec += time.perf_counter() - t0
        return out

    def _aggregate(self, n: int, u: int, v: Vec | None, broadcast: bool) -> Vec | None:
        """One aggregation of node ``u`` (layer ``n``) from its current model ``v``."""
        layout, rank, st = self.layout, self.rank, self.stats
        L = self.msg_len[n - 1]
        lc = self.comms[n]
        spanning = lc is not None and lc.node == u
        leaders = lc.leaders if spanning and lc is not None else None
        leads_u = layout.leader(n, u) == rank
        chosen = self._participants(n, u)
        first_kid = self.tree.children(n, u).start
        if len(chosen) == 0:  # nobody takes part: the node keeps its model, nothing moves
            return v
        remote: list[tuple[np.ndarray, MPI.Request]] = []
        acc = self.vectors.zeros(self.dim) if leads_u else None
        weights = dict(zip((first_kid + chosen).tolist(), self.weights(n, u, chosen))) if leads_u else {}
        if leads_u and leaders is not None:  # posted first: the other ranks' messages arrive while we work
            assert lc is not None and lc.leader_counts is not None  # set for every member of ``leaders``
            counts = lc.leader_counts if len(chosen) == len(lc.kid_leaders) else lc.counts_for(chosen)
            remote = post_receives(leaders, counts, L, tag=n)
        parts: list[np.ndarray] = []
        mine = self._my_children(n, u)
        kids = [c for c in (first_kid + chosen).tolist() if mine.start <= c < mine.stop]
        trained = self._train_together(u, kids, v) if n == 1 and self.train_many_fn is not None else None
        for i, c in enumerate(kids):
            x = trained[i] if trained is not None else self._work(n - 1, c, v)
            if layout.leader(n - 1, c) != rank:
                continue
            assert x is not None and v is not None
            t0 = time.perf_counter()
            msg = self._encode(n, c, x, v, weights.get(c), acc)  # u's own children come first in child order
            if msg is not None:
                parts.append(msg)
            elif remote:
                MPI.Request.Testall([r for _, r in remote])  # let MPI progress the transfers
            st.t_codec += time.perf_counter() - t0
            st.uplink_bytes[n - 1] += L
            st.messages[n - 1] += 1
        if leaders is not None and not leads_u:  # a child's leader that does not lead u: send and go on
            t0 = time.perf_counter()
            send_messages(leaders, parts, tag=n, guard=self.guard)
            st.t_comm += time.perf_counter() - t0
        new = None
        if acc is not None:
            assert v is not None
            codec = self._up[n - 1]
            senders = [c for c in (first_kid + chosen).tolist() if layout.leader(n - 1, c) != rank]
            for c, (msg, req) in zip(senders, remote):  # the others' children, in child order
                t0 = time.perf_counter()
                wait(req, self.guard)
                t1 = time.perf_counter()
                codec.decode_add(msg, weights[c], acc)
                st.t_comm += t1 - t0
                st.t_codec += time.perf_counter() - t1
            t0 = time.perf_counter()
            new = self._update(n, u, v, acc)
            st.t_codec += time.perf_counter() - t0
        if broadcast:
            assert v is not None
            new = self._downlink(n, u, v, new, spanning, lc, leads_u)
        return new
