"""The round's executor: carries out a :class:`~qmlhfl_mpi.core.plan.RoundPlan` on one rank.

Every rank walks the same plan's events in the same order and does its
part of each (docs/architecture.md, "The life of a round"):

* ``OPEN`` of node ``u``'s aggregation, on the ranks hosting part of ``u``'s
  subtree: ``u`` starts from its parent's model (first repetition) or its
  own; ``u``'s leader makes the accumulator and, when ``u`` spans several
  ranks, posts the receives of the other ranks' messages; at layer 1 the
  rank trains its participating devices (:class:`~qmlhfl_mpi.core.clients.Clients`)
  and encodes their messages.
* ``CLOSE``: the children's leaders on other ranks send their messages; ``u``'s
  leader decodes them in child order and applies the layer's server
  optimiser; the new model goes down to ``u``'s subtree, or (``u``'s last
  repetition) ``u``'s leader encodes it as ``u``'s message to its parent.

A message is ``codec.encode(x, v, key)`` of the child's model ``x`` against
its parent's starting model ``v`` (with error feedback ``Q(x - v + e)``),
added to the parent's float32 accumulator with the child's weight in child
order (``encode_add`` where both live on one rank, bit-identical to
``decode_add(encode(...))``), which is why the model is the same for any
number of ranks.  The vectors are those of the :class:`~qmlhfl_mpi.core.vectors.Vectors`
backend (numpy on the host, or torch tensors on the training device); MPI
only moves host bytes.  :meth:`RoundExecutor.run` is collective over the
layer communicators.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

from ..core.admm import Admm
from ..core.clients import Clients
from ..core.codecs.intsum import IntSumCodec
from ..core.links import Link
from ..core.plan import OPEN, Aggregation, RoundPlan
from ..core.privacy import Mechanism, clip_scale, largest_device_weight
from ..core.secagg import recovery_bytes
from ..core.server_opt import Average
from ..core.stats import RoundStats
from ..core.topology import RankLayout
from ..core.vectors import LinkCodec, Vectors, through_host
from .collectives import broadcast_bytes, broadcast_vector, post_receives, send_messages, wait
from .communicators import LayerComms
from .held import HeldMessages
from .summing import SummedLink
from .watchdog import Watchdog

Vec = Any  # a vector of the backend: numpy array or torch tensor

__all__ = ["RoundExecutor"]


class RoundExecutor:
    """Carries out round plans on one rank (see the module doc).  The per-node state it keeps (server
    optimisers' vectors, error-feedback residuals) lives on the rank that leads the node or sender."""

    def __init__(self, layout: RankLayout, rank: int, comms: Sequence[LayerComms | None], links: Sequence[Link],
                 dim: int, clients: Clients, vectors: Vectors, guard: Watchdog | None = None,
                 world: MPI.Intracomm | None = None, privacy: Mechanism | None = None,
                 secure: Sequence[bool] = (), admm: Admm | None = None) -> None:
        tree = layout.tree
        if len(links) != tree.N:
            raise ValueError(f"need {tree.N} links, got {len(links)}")
        self.layout, self.tree, self.rank, self.comms = layout, tree, rank, list(comms)
        self.links, self.dim, self.clients, self.vectors, self.guard = tuple(links), dim, clients, vectors, guard
        self.privacy = privacy  # docs/privacy.md: clipping (and local noise) at training, noise at its layer
        self.clip = privacy.clip if privacy is not None else 0.0  # the clip now (adaptive: set every round)
        self.clip_counts = np.zeros(2, dtype=np.int64)  # this rank's updates within the clip, and all, this round
        self.admm = admm  # ADMM (core/admm.py): a dual per child of the ADMM layer, on the rank that leads it
        self.duals: dict[int, np.ndarray] = {}      # child (a device at layer 1, else a layer L-1 node) -> dual
        self._anchors: dict[int, np.ndarray] = {}   # ADMM above layer 1: layer L-1 node -> its subtree's anchor
        # links whose parents add integer codes (intsum), masked where the layer runs secure aggregation
        shares = privacy if privacy is not None and privacy.shares else None  # distributed DP: in link 1's codes
        self._summed = [SummedLink(n, lk.codec, dim, bool(secure[n - 1]) if secure else False,
                                   shares if n == 1 else None)
                        if isinstance(lk.codec, IntSumCodec) else None for n, lk in enumerate(links, start=1)]
        self.msg_len = [lk.codec.nbytes(dim) for lk in links]
        self.down_len = [4 * dim if lk.downlink is None else lk.downlink.nbytes(dim) for lk in links]
        self._up: list[LinkCodec] = [vectors.link_codec(lk.codec) for lk in links]
        self._down: list[LinkCodec | None] = [None if lk.downlink is None else vectors.link_codec(lk.downlink)
                                              for lk in links]
        self._zero: Vec | None = None
        self.server_state: dict[tuple[int, int], dict[str, Vec]] = {}
        self.residuals: dict[tuple[int, int], Vec] = {}
        self.stats = RoundStats(np.zeros(0, dtype=np.int64), tree.N)
        self._mine = [layout.nodes_of(rank, n) for n in range(tree.N + 1)]  # nodes this rank hosts part of
        # while a round runs: the nodes' models, the leaders' accumulators, pending receives and sends
        self._model: dict[tuple[int, int], Vec] = {}
        self._acc: dict[tuple[int, int], Vec] = {}
        self._remote: dict[tuple[int, int], list[tuple[np.ndarray, MPI.Request]]] = {}
        self._parts: dict[tuple[int, int], list[np.ndarray]] = {}
        # the tree of the moment (plans with ``members``): layer 1 moves point to point on the run's communicator
        self.world = world
        self._moving: dict[int, dict[int, np.ndarray]] = {}             # edge -> child position -> its message
        self._moving_recv: dict[int, list[tuple[int, np.ndarray, MPI.Request]]] = {}
        self._sends: list[tuple[np.ndarray, MPI.Request]] = []          # until the round ends
        # buffered layers (core/tiers.py): the messages in flight and buffered, each on the leader of the node
        # it goes to; every buffered node's model and the model its job started from (below the cloud), on
        # every rank
        self.hold = False
        self._root = (tree.N, 0)
        self.held = HeldMessages(dim, self.msg_len)
        self.tier_models: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    # ---- who does what ----------------------------------------------------------
    def involved(self, n: int, u: int) -> bool:
        """Whether this rank hosts part of node ``u``'s subtree (layer ``n``)."""
        return u in self._mine[n]

    def leads(self, n: int, u: int) -> bool:
        return self.layout.leader(n, u) == self.rank

    def _spanning(self, n: int, u: int) -> LayerComms | None:
        """The communicators of node ``u`` if it spans several ranks and this rank is in its subtree."""
        lc = self.comms[n]
        return lc if lc is not None and lc.node == u else None

    def links_through_host(self) -> list[str]:
        """The links whose codec moves float vectors through the host on this backend (none on the host)."""
        out = [f"uplink {n} ({lk.codec.name})" for n, (lk, c) in enumerate(zip(self.links, self._up), 1)
               if through_host(c, self.dim)]
        out += [f"downlink {n} ({lk.downlink.name})" for n, (lk, dc) in enumerate(zip(self.links, self._down), 1)
                if lk.downlink is not None and dc is not None and through_host(dc, self.dim)]
        return out

    # ---- the round --------------------------------------------------------------
    def run(self, plan: RoundPlan, w: np.ndarray, stats: RoundStats | None = None, hold: bool = False,
            root: tuple[int, int] | None = None) -> np.ndarray:
        """Carry out ``plan`` from the model ``w`` (a host array) of its root ``root`` (default the cloud); every
        rank returns the root's new model.  ``stats``: count into these (else a fresh :class:`RoundStats` of the
        plan's devices).  ``hold``: the plan is one job of a buffered node (one participant): its message stays
        on the node's leader (:attr:`held`) and ``w`` is returned unchanged.  Collective."""
        N = self.tree.N
        self.stats = RoundStats(plan.devices(), N) if stats is None else stats
        self.hold = hold
        self._root = root = root if root is not None else (N, 0)
        self._model = {root: self.vectors.from_host(w)}
        moving = plan.members is not None
        if moving and self.world is None and self.layout.num_ranks > 1:
            raise ValueError("a plan on the tree of the moment needs the run's communicator (world=)")
        for kind, a in plan:
            if moving and a.layer == 1:
                if kind == OPEN:
                    self._open_moving(plan, a)
                    continue
                if self.leads(1, a.node):
                    self._close_moving(plan, a)
                if N == 1 and self.layout.num_ranks > 1:  # the edge is the cloud: its model goes to every rank
                    assert self.world is not None
                    mine = self._model.get((1, 0)) if self.leads(1, 0) else None
                    got = broadcast_vector(self.world, None if mine is None else self.vectors.to_host(mine),
                                           self.dim, self.guard)
                    self._model[(1, 0)] = mine if mine is not None else self.vectors.from_host(got)
                continue
            if not self.involved(a.layer, a.node):
                continue
            if kind == OPEN:
                self._open(plan, a)
            else:
                self._close(plan, a)
        for _, req in self._sends:
            wait(req, self.guard)
        self._sends.clear()
        out = self._model.pop(root)
        self._model.clear()
        return self.vectors.to_host(out)

    # ---- layer 1 on the tree of the moment ----------------------------------------
    def _tag(self, u: int) -> int:
        return 1024 + u % 8192  # one tag per edge (modulo): messages of one edge keep their order per sender

    def _open_moving(self, plan: RoundPlan, a: Aggregation) -> None:
        """Edge ``u``'s aggregation when its devices may live anywhere: its leader sends the edge's model to every
        other rank hosting a participant and posts a receive per remote participant, in child order; each host
        trains its participants and sends (or, on the leader, keeps) their messages."""
        u, lead = a.node, self.layout.leader(1, a.node)
        me = self.rank
        if a.first and a.parent >= 0 and me == lead:
            self._model[(1, u)] = self._model[(2, self.tree.parent(1, u))]
        if a.empty:
            return
        hosts = np.searchsorted(self.layout.bounds, a.children, side="right") - 1
        if me != lead and me not in hosts:
            return
        tag = self._tag(u)
        if me == lead:
            v = self._model[(1, u)]
            host_v = np.array(self.vectors.to_host(v), dtype=np.float32)  # a copy: sent while v lives on
            for h in sorted(set(hosts.tolist()) - {me}):
                assert self.world is not None
                self._sends.append((host_v, self.world.Isend([host_v, MPI.FLOAT], dest=h, tag=tag)))
            self._acc[(1, u)] = self.vectors.zeros(self.dim)
            self._moving[u] = {}
            recvs = []
            for j in np.flatnonzero(hosts != me).tolist():
                assert self.world is not None
                buf = np.empty(self.msg_len[0], dtype=np.uint8)
                recvs.append((j, buf, self.world.Irecv([buf, MPI.BYTE], source=int(hosts[j]), tag=tag)))
            self._moving_recv[u] = recvs
        else:
            assert self.world is not None
            got = np.empty(self.dim, dtype=np.float32)
            t0 = time.perf_counter()
            wait(self.world.Irecv([got, MPI.FLOAT], source=lead, tag=tag), self.guard)
            self.stats.t_comm += time.perf_counter() - t0
            v = self.vectors.from_host(got)
        local = np.flatnonzero(hosts == me).tolist()
        st = self.stats
        for j, dev, trained in self._trained(plan, a, local, v):
            t0 = time.perf_counter()
            x, base = self._private(plan, a, j, trained, v)
            msg = self._encode(1, dev, x, base, plan.message_key(a, j), None, None)
            assert msg is not None
            if me == lead:
                self._moving[u][j] = msg
            else:
                assert self.world is not None
                self._sends.append((msg, self.world.Isend([msg, MPI.BYTE], dest=lead, tag=tag)))
            st.t_codec += time.perf_counter() - t0
            st.uplink_bytes[0] += self.msg_len[0]
            st.messages[0] += 1
        if me != lead:
            self._model.pop((1, u), None)

    def _close_moving(self, plan: RoundPlan, a: Aggregation) -> None:
        """On edge ``u``'s leader: every participant's message in child order, the server step, and the new model
        kept for the edge's next aggregation (whose opening sends it on) or sent up."""
        u = a.node
        v = self._model[(1, u)]
        new = v
        if not a.empty:
            st, codec = self.stats, self._up[0]
            acc = self._acc.pop((1, u))
            kept = self._moving.pop(u)
            for j, buf, req in self._moving_recv.pop(u):
                t0 = time.perf_counter()
                wait(req, self.guard)
                st.t_comm += time.perf_counter() - t0
                kept[j] = buf
            t0 = time.perf_counter()
            for j in range(len(a.children)):
                codec.decode_add(kept[j], a.weights[j], acc)
            new = self._update(1, u, v, acc)
            st.t_codec += time.perf_counter() - t0
            if a.down:
                self._model[(1, u)] = self._downlink(plan, a, v, new, None, True)
                return
        if a.last and a.parent >= 0:
            parent = plan.aggregations[a.parent]
            self._send_up(plan, parent, a.slot, new, self._model[(2, parent.node)])
        if a.last:
            self._model.pop((1, u), None)

    def _open(self, plan: RoundPlan, a: Aggregation) -> None:
        n, u = a.layer, a.node
        if a.first and a.parent >= 0:  # the first repetition starts from the parent's model
            self._model[(n, u)] = self._model[(n + 1, self.tree.parent(n, u))]
            if self.admm is not None and self.admm.layer == n + 1:  # a subtree's anchor for the parent's period
                self._anchor(n, u)
        if a.empty:
            return
        v = self._model[(n, u)]
        first_kid = self.tree.children(n, u).start
        lc = self._spanning(n, u)
        summed = self._summed[n - 1]
        if summed is not None:
            summed.open(plan, a, self.leads(n, u))
        if self.leads(n, u):
            self._acc[(n, u)] = self.vectors.zeros(self.dim)
            if lc is not None and lc.leaders is not None:  # posted first: the others' messages arrive meanwhile
                assert lc.leader_counts is not None
                positions = a.children - first_kid
                counts = lc.leader_counts if len(positions) == len(lc.kid_leaders) else lc.counts_for(positions)
                self._remote[(n, u)] = post_receives(lc.leaders, counts, self.msg_len[n - 1], tag=n)
        if n != 1:
            return
        mine = self._mine[0]
        local = [j for j, c in enumerate(a.children.tolist()) if mine.start <= c < mine.stop]
        if not local:
            return
        for j, _, x in self._trained(plan, a, local, v):
            self._send_up(plan, a, j, *self._private(plan, a, j, x, v))

    def _trained(self, plan: RoundPlan, a: Aggregation, local: list[int], v: Vec) -> Iterator[tuple[int, int, Vec]]:
        """The participants at positions ``local`` of layer-1 aggregation ``a`` (this rank's) trained from ``v``,
        one after another as ``(position, device, vector)``; their losses, steps and seconds counted."""
        devices = [int(a.children[j]) for j in local]
        calls = [int(a.train_calls[j]) for j in local]
        st = self.stats
        admm, kw = self.admm, {}
        if admm is not None and admm.layer > 1:  # the device's subtree's anchor (set when the period began)
            c = a.node
            for n in range(1, admm.layer - 1):
                c = self.tree.parent(n, c)
            z = self._anchors[c]
            kw["prox"] = (admm.rho, lambda dev: z)
            admm = None  # the dual step is the subtree's, at its send-up (_close), not the devices'
        elif admm is not None:  # each device's augmented local problem: FedProx's term toward its anchor
            host_v = np.asarray(self.vectors.to_host(v), dtype=np.float32)
            kw["prox"] = (admm.rho, lambda dev: admm.anchor(host_v, self.duals.get(dev)))
        t0 = time.perf_counter()
        for j, dev, (x, loss_sum, steps) in zip(local, devices, self.clients.train(
                v, devices, plan.round, calls, a.children, **kw)):
            st.t_compute += time.perf_counter() - t0
            st.add(dev, loss_sum, steps)
            if admm is not None:  # the dual step; the device sends its augmented model
                self.duals[dev], aug = admm.step(np.asarray(self.vectors.to_host(x)), host_v, self.duals.get(dev))
                yield j, dev, self.vectors.from_host(aug)
            else:
                yield j, dev, x
            t0 = time.perf_counter()

    def _anchor(self, n: int, c: int) -> None:
        """ADMM at layer ``n + 1``: child ``c``'s anchor ``z_c = v - y_c / rho`` for its subtree's training in the
        parent's period, made on ``c``'s leader from the parent's model (just taken as ``c``'s) and shared with the
        ranks of ``c``'s subtree.  It travels down the subtree beside the model: counted as one float32 vector per
        node and device below ``c`` on each of links ``1..n``."""
        assert self.admm is not None
        z = None
        if self.leads(n, c):
            v = np.asarray(self.vectors.to_host(self._model[(n, c)]), dtype=np.float32)
            z = self.admm.anchor(v, self.duals.get(c))
            lo, hi = c, c + 1
            for m in range(n, 0, -1):  # the layer m-1 descendants of c: receivers on link m
                lo, hi = self.tree.children(m, lo).start, self.tree.children(m, hi - 1).stop
                self.stats.downlink_bytes[m - 1] += 4 * self.dim * (hi - lo)
        lc = self._spanning(n, c)
        if lc is not None and lc.subtree is not None:
            t0 = time.perf_counter()
            z = broadcast_vector(lc.subtree, z, self.dim, self.guard)
            self.stats.t_comm += time.perf_counter() - t0
        assert z is not None
        self._anchors[c] = np.asarray(z, dtype=np.float32)

    def _close(self, plan: RoundPlan, a: Aggregation) -> None:
        n, u = a.layer, a.node
        leads = self.leads(n, u)
        v = self._model[(n, u)]
        if self.hold and (n, u) == self._root:
            self._hold(a, leads)
            return
        summed = self._summed[n - 1]
        if a.empty and leads and summed is not None and summed.secure and a.group is not None:
            g = len(a.group)  # a key group that aborted (too few survivors): its keys were exchanged, no seed
            self.stats.secagg_bytes[n - 1] += sum(recovery_bytes(g, g))
        new = v if a.empty else None
        if not a.empty:
            lc = self._spanning(n, u)
            parts = self._parts.pop((n, u), [])
            if lc is not None and lc.leaders is not None and not leads:  # a child's leader that does not lead u
                t0 = time.perf_counter()
                send_messages(lc.leaders, parts, tag=n, guard=self.guard)
                self.stats.t_comm += time.perf_counter() - t0
            if leads:
                new = self._apply(plan, a, v)
            if a.down:
                self._model[(n, u)] = self._downlink(plan, a, v, new, lc, leads)
                return
        if a.last and a.parent >= 0 and leads:  # the node's model goes up as its message
            parent = plan.aggregations[a.parent]
            assert new is not None
            base = self._model[(n + 1, parent.node)]
            if self.admm is not None and self.admm.layer == n + 1:  # the dual step; the augmented model goes up
                host = self.vectors.to_host
                self.duals[u], aug = self.admm.step(np.asarray(host(new)), np.asarray(host(base)), self.duals.get(u))
                new = self.vectors.from_host(aug)
            self._send_up(plan, parent, a.slot, new, base)
        if a.last:
            self._model.pop((n, u), None)

    def _hold(self, a: Aggregation, leads: bool) -> None:
        """The close of a buffered node's job: its one message reaches the node's leader and is kept there
        (:attr:`held`); nothing is aggregated, nothing goes down."""
        n, u = a.layer, a.node
        lc = self._spanning(n, u)
        parts = self._parts.pop((n, u), [])
        if a.empty:
            return
        if lc is not None and lc.leaders is not None and not leads:
            send_messages(lc.leaders, parts, tag=n, guard=self.guard)
        if leads:
            self._acc.pop((n, u), None)
            got = list(parts)
            for msg, req in self._remote.pop((n, u), []):
                wait(req, self.guard)
                got.append(msg)
            assert len(got) == 1, f"a buffered node's job has one message, got {len(got)}"
            self.held.keep(n, int(a.children[0]), got[0])

    # ---- buffered layers (core/tiers.py) --------------------------------------------
    def arrive(self, n: int, u: int, c: int) -> None:
        """Child ``c``'s message in flight reaches node ``u`` of buffered layer ``n`` (on its leader, counted on
        link ``n`` there).  Not collective."""
        if self.leads(n, u):
            self.held.arrive(n, u, c)
            self.stats.uplink_bytes[n - 1] += self.msg_len[n - 1]
            self.stats.messages[n - 1] += 1

    def flush(self, n: int, u: int, entries: Sequence[tuple[int, np.float32]], w: np.ndarray) -> np.ndarray:
        """Buffered node ``u``'s update from its model ``w``: its buffered messages ``entries`` ``(position,
        weight)`` decoded into one float32 sum in that order, then its layer's server optimiser; every rank
        returns the new model.  Collective over the run's communicator."""
        st, first = self.stats, self.tree.children(n, u).start
        new = None
        if self.leads(n, u):
            t0 = time.perf_counter()
            v = self.vectors.from_host(w)
            acc = self.vectors.zeros(self.dim)
            msgs = self.held.take(n, u, [first + pos for pos, _ in entries])
            for msg, (_, weight) in zip(msgs, entries, strict=True):
                self._up[n - 1].decode_add(msg, weight, acc)
            new = np.array(self.vectors.to_host(self._update(n, u, v, acc)), dtype=np.float32)
            st.t_codec += time.perf_counter() - t0
        if self.world is not None and self.world.Get_size() > 1:
            t0 = time.perf_counter()
            new = broadcast_vector(self.world, new, self.dim, self.guard, root=self.layout.leader(n, u))
            st.t_comm += time.perf_counter() - t0
        assert new is not None
        return new

    def send(self, n: int, u: int, key: tuple[int, ...]) -> None:
        """Buffered node ``u`` of layer ``n`` (below the cloud) sends its job's delta ``Q(x - start)`` up: made on
        its leader (with its error feedback), moved to its parent's leader, held there until it arrives.
        Collective over the two leaders (every rank may call it)."""
        p = self.tree.parent(n, u)
        me, src, dst = self.rank, self.layout.leader(n, u), self.layout.leader(n + 1, p)
        if me not in (src, dst):
            return
        msg = None
        if me == src:
            t0 = time.perf_counter()
            x, start = (self.vectors.from_host(v) for v in self.tier_models[(n, u)])
            msg = self._encode(n + 1, u, x, start, key, None, None)
            self.stats.t_codec += time.perf_counter() - t0
        t0 = time.perf_counter()
        if src != dst:
            assert self.world is not None
            if me == src:
                wait(self.world.Isend([msg, MPI.BYTE], dest=dst, tag=2048 + n), self.guard)
                return
            msg = np.empty(self.msg_len[n], dtype=np.uint8)
            wait(self.world.Irecv([msg, MPI.BYTE], source=src, tag=2048 + n), self.guard)
        self.stats.t_comm += time.perf_counter() - t0
        assert msg is not None
        self.held.keep(n + 1, u, msg)

    def adopt(self, n: int, u: int, w: np.ndarray) -> None:
        """Buffered node ``u`` of layer ``n`` takes its parent's model ``w`` (on every rank; counted on link
        ``n + 1`` by the parent's leader).  Not collective."""
        self.tier_models[(n, u)] = (w.copy(), w.copy())
        if self.leads(n + 1, self.tree.parent(n, u)):
            self.stats.downlink_bytes[n] += self.down_len[n]

    def share_tiers(self, nodes: Sequence[tuple[int, int]]) -> None:
        """The models of the buffered nodes ``nodes`` (below the cloud) from each one's leader to every rank
        (after a resume each leader loaded its own).  Collective over the run's communicator."""
        if self.world is None or self.world.Get_size() == 1:
            return
        for (n, u) in nodes:
            got = self.tier_models.get((n, u))
            root = self.layout.leader(n, u)
            pair = [broadcast_vector(self.world, None if got is None else got[i], self.dim, self.guard, root=root)
                    for i in range(2)]
            self.tier_models[(n, u)] = (pair[0], pair[1])

    def _send_up(self, plan: RoundPlan, parent: Aggregation, j: int, x: Vec, v: Vec) -> None:
        """Participant ``j``'s message in ``parent``'s aggregation, made on the child's leader (this rank): added to
        the parent's accumulator when this rank leads the parent too, else kept to be sent at its close."""
        n, p = parent.layer, parent.node
        st = self.stats
        t0 = time.perf_counter()
        acc = None if self.hold and (n, p) == self._root else self._acc.get((n, p))
        key = plan.message_key(parent, j)
        summed = self._summed[n - 1]
        if summed is not None:  # integer codes of the update, added on the parent's leader
            update = np.asarray(self.vectors.to_host(x - v), dtype=np.float32)
            msg = summed.add(plan, parent, j, update, self.leads(n, p))
        else:
            msg = self._encode(n, int(parent.children[j]), x, v, key, parent.weights[j] if acc is not None else None,
                               acc)
        if msg is not None:
            self._parts.setdefault((n, p), []).append(msg)
        elif self._remote.get((n, p)):
            MPI.Request.Testall([r for _, r in self._remote[(n, p)]])  # let MPI progress the transfers
        st.t_codec += time.perf_counter() - t0
        st.uplink_bytes[n - 1] += self.msg_len[n - 1]
        st.messages[n - 1] += 1

    def _encode(self, n: int, c: int, x: Vec, v: Vec, key: tuple[int, ...], a: np.float32 | None,
                acc: Vec | None) -> np.ndarray | None:
        """Child ``c``'s message to its parent (``acc += a * decoded`` instead when ``acc`` is given)."""
        codec = self._up[n - 1]
        if self.links[n - 1].error_feedback:  # m = Q(x - v + e), e <- x - v + e - decode(m)
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

    def _private(self, plan: RoundPlan, a: Aggregation, j: int, x: Vec, v: Vec) -> tuple[Vec, Vec]:
        """Participant ``j`` of layer-1 aggregation ``a`` trained to ``x`` from ``v``: with privacy, its update
        clipped (and, placed locally, noised) as ``(update, 0)``, which the codec encodes like ``(x, v)``."""
        mech = self.privacy
        if mech is None:
            return x, v
        u = x - v
        host = np.asarray(self.vectors.to_host(u), dtype=np.float64)
        norm = float(np.sqrt(np.dot(host, host)))
        self.clip_counts += (int(norm <= self.clip), 1)
        u *= float(clip_scale(norm, self.clip))  # a float32 value
        if mech.layer == 0:
            key = (0, int(a.children[j]), plan.round, int(a.train_calls[j]))
            u += self.vectors.from_host(mech.noise(self.dim, key, mech.local_std(self.clip)))
        if self._zero is None:
            self._zero = self.vectors.zeros(self.dim)
        return u, self._zero

    def _apply(self, plan: RoundPlan, a: Aggregation, v: Vec) -> Vec:
        """On the node's leader: the other ranks' messages in child order, then (at the privacy layer) the
        noise, then the layer's server step."""
        n, u = a.layer, a.node
        st = self.stats
        acc = self._acc.pop((n, u))
        remote = self._remote.pop((n, u), [])
        summed = self._summed[n - 1]
        if summed is not None:  # the children's codes added up: the weighted sum, exactly
            for msg, req in remote:
                t0 = time.perf_counter()
                wait(req, self.guard)
                t1 = time.perf_counter()
                summed.add_message(a, msg)
                st.t_comm += t1 - t0
                st.t_codec += time.perf_counter() - t1
            total, extra = summed.close(plan, a)
            acc = self.vectors.from_host(total)
            st.secagg_bytes[n - 1] += extra
            remote = []
        if remote:
            codec = self._up[n - 1]
            weight = dict(zip(a.children.tolist(), a.weights))
            senders = [c for c in a.children.tolist() if self.layout.leader(n - 1, c) != self.rank]
            for c, (msg, req) in zip(senders, remote):
                t0 = time.perf_counter()
                wait(req, self.guard)
                t1 = time.perf_counter()
                codec.decode_add(msg, weight[c], acc)
                st.t_comm += t1 - t0
                st.t_codec += time.perf_counter() - t1
        t0 = time.perf_counter()
        mech = self.privacy
        if mech is not None and mech.layer == n and not mech.shares:
            std = mech.node_std(largest_device_weight(plan, plan.aggregations.index(a)), self.clip)
            acc += self.vectors.from_host(mech.noise(self.dim, (n, u, plan.round, a.call), std))
        new = self._update(n, u, v, acc)
        st.t_codec += time.perf_counter() - t0
        return new

    def _update(self, n: int, u: int, v: Vec, g: Vec) -> Vec:
        """The node's optimiser applied to the decoded update ``g``."""
        opt = self.links[n - 1].server
        if isinstance(opt, Average):
            return v + g
        st = self.server_state.get((n, u))
        if st is None:
            st = self.server_state[(n, u)] = {k: self.vectors.from_host(x) for k, x in opt.init_state(self.dim).items()}
        return opt.apply(v, g, st)

    def _downlink(self, plan: RoundPlan, a: Aggregation, v: Vec, new: Vec | None, lc: LayerComms | None,
                  leads: bool) -> Vec:
        """Send node ``u``'s new model down to its subtree; every member returns the same vector.

        Counted on link ``n``: one message of :attr:`down_len` bytes per child of the node in this round."""
        n = a.layer
        st, codec = self.stats, self._down[n - 1]
        spanning = lc is not None and lc.subtree is not None
        if leads:
            st.downlink_bytes[n - 1] += self.down_len[n - 1] * plan.fanout(self.tree, a)
        if codec is None:
            if spanning:
                assert lc is not None and lc.subtree is not None
                t0 = time.perf_counter()
                vec = self.vectors
                got = broadcast_vector(lc.subtree, None if new is None else vec.to_host(new), self.dim, self.guard)
                new = new if new is not None else vec.from_host(got)  # the root keeps its own vector
                st.t_comm += time.perf_counter() - t0
            assert new is not None
            return new
        t0 = time.perf_counter()
        msg = None
        if leads:
            assert new is not None
            msg = codec.encode(new, v, plan.down_key(a))
        st.t_codec += time.perf_counter() - t0
        if spanning:
            assert lc is not None and lc.subtree is not None
            t0 = time.perf_counter()
            msg = broadcast_bytes(lc.subtree, msg, self.down_len[n - 1], self.guard)
            st.t_comm += time.perf_counter() - t0
        assert msg is not None
        t0 = time.perf_counter()
        out = self.vectors.copy(v)
        codec.decode_add(msg, np.float32(1), out)
        st.t_codec += time.perf_counter() - t0
        return out

    # ---- per-node state (server optimisers, error feedback) -----------------------
    def state(self) -> dict[str, np.ndarray]:
        """The per-node state this rank keeps, by name (``server.n.u.name``, ``residual.n.c``; buffered layers:
        ``tier.n.u.model``/``start``, ``held.*``, ``buffer.*``), as host arrays."""
        host = self.vectors.to_host
        out = {f"server.{n}.{u}.{k}": host(x) for (n, u), st in self.server_state.items() for k, x in st.items()}
        out.update({f"residual.{n}.{c}": host(e) for (n, c), e in self.residuals.items()})
        if self.admm is not None:
            out.update({f"dual.{self.admm.layer}.{i}": y for i, y in self.duals.items()})
        for (n, u), (x, start) in self.tier_models.items():
            if self.leads(n, u):
                out[f"tier.{n}.{u}.model"], out[f"tier.{n}.{u}.start"] = x, start
        out.update(self.held.state())
        return out

    def state_vectors(self) -> int:
        """How many float32 vectors of the model's length the per-node state may hold (all ranks together)."""
        tree, out = self.tree, self.held.slots
        for n, lk in enumerate(self.links, start=1):
            if not isinstance(lk.server, Average):
                out += tree.num_nodes(n) * len(lk.server.state_names)
            if lk.error_feedback:
                out += tree.num_nodes(n - 1)
        if self.admm is not None:
            out += tree.num_nodes(self.admm.layer - 1)
        return out

    def owner(self, name: str) -> int:
        """The rank that keeps the state entry ``name`` (of :meth:`state`) in this layout."""
        kind, n, u = name.split(".")[:3]
        layer, node = int(n), int(u)
        if kind == "held":  # on the leader of the node it goes to
            return self.layout.leader(layer, self.tree.parent(layer - 1, node))
        if kind in ("server", "tier", "buffer"):
            return self.layout.leader(layer, node)
        if kind in ("residual", "dual"):
            return self.layout.leader(layer - 1, node)
        raise ValueError(f"state {name!r} is of no known kind (server., residual., dual., tier., held., buffer.)")

    def load_state(self, entries: dict[str, np.ndarray]) -> None:
        """Take over the entries of :meth:`state` that this rank keeps (after a resume)."""
        mine = {k: x for k, x in entries.items() if self.owner(k) == self.rank}
        self.held.load({k: x for k, x in mine.items() if k.split(".")[0] in ("held", "buffer")})
        tiers: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for name, x in mine.items():
            parts = name.split(".")
            if parts[0] in ("held", "buffer"):
                continue
            vec = np.array(x, dtype=np.float32).reshape(-1)
            if vec.size != self.dim:
                raise ValueError(f"checkpoint state {name!r} has {vec.size} values, the model {self.dim}")
            if parts[0] == "server":
                self.server_state.setdefault((int(parts[1]), int(parts[2])), {})[parts[3]] = self.vectors.from_host(vec)
            elif parts[0] == "residual":
                self.residuals[(int(parts[1]), int(parts[2]))] = self.vectors.from_host(vec)
            elif parts[0] == "dual":
                self.duals[int(parts[2])] = vec
            else:
                tiers.setdefault((int(parts[1]), int(parts[2])), {})[parts[3]] = vec
        for key, got in tiers.items():
            if set(got) != {"model", "start"}:
                raise ValueError(f"checkpoint state of buffered node {key} has {sorted(got)}, expected model, start")
            self.tier_models[key] = (got["model"], got["start"])
