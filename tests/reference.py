"""A deliberately simple serial QMLHFL: plain loops over a nested-list tree.

Written from docs/algorithm.md for the tests; it shares nothing with the engine
(topology, comm, aggregate, train, session) except the codecs (called through
their public interface), the data generator and the model definition (its
inputs).  Random streams follow the
documented keys (docs/reproducibility in docs/results.md):
  minibatches  SeedSequence([seed, 3, device, round, call])
  quantizer    key (seed, 4, layer, child index, round, call), drawn by the codec
  sampling     SeedSequence([seed, 8, layer, node, round, aggregation call]).choice
  availability SeedSequence([seed, 9, layer, node, round, aggregation call]).random(children) < p
  downlink     key (seed, 10, layer, node, round, aggregation call), drawn by a qsgd codec
  speeds       SeedSequence([seed, 11, 0]).random((2, devices)): lognormal factor from (1 - u0, u1) (Box-Muller)
  jitter       the codec stream keyed (seed, 11, 1, round) at counters 2d and 2d + 1
  mobility     the codec stream keyed (mobility seed, 12, round) at counters 2d (moves?) and 2d + 1 (where)
The tree of the moment (docs/algorithms.md, "Devices that move", "Edge servers that fail") is rebuilt every
round as nested lists from each device's edge; a node left with no device takes no part in its parent's
aggregations.
The virtual clock and the aggregation policies (docs/system.md) are a first pass over the round in plain
loops that decides whom each aggregation keeps; the second pass trains only those, and the children it does
not keep still advance their call counters (their keys are what they would have been).
Buffered layers (a top segment m..N; the buffered cloud is m = N) run as events in plain loops (run_tiered,
after core/tiers.py's docstring): a layer-m node's child works in jobs, each one synchronous round of the node's
subtree with that child alone (its counters and keys those of the child's place in the synchronous round); a
node above buffers, updates every k arrivals, and works for its parent in jobs of tau updates.
The options (sampling, availability, server optimisers, error feedback,
downlink quantization, the client optimiser) follow docs/algorithm.md section 5 and
docs/algorithms.md, written again here as plain loops.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from qmlhfl_mpi.core.codecs import make_codec
from qmlhfl_mpi.core.codecs.stream import key_words, uniforms_at
from qmlhfl_mpi.core.ddgauss import discrete_gaussian

try:
    from reference_client import sgd_run
except ImportError:  # pragma: no cover - the module lives beside this one in tests/
    sgd_run = None


ARRIVE, ADOPT, START = 0, 1, 2  # the phases of the buffered tiers' events at one instant


@dataclass
class Node:
    layer: int
    index: int
    children: list[Node] = field(default_factory=list)
    devices: list[int] = field(default_factory=list)


@dataclass
class Tier:
    """A node of a buffered layer in a run of the buffered tiers: its model ``x``, the model ``s`` it last
    adopted, its version, whether it is paused (sent, not yet adopted again), its updates in the current job
    (``done``), the jobs it has sent, the parent's version its job started from (``since``), its buffer of
    (child position, version the child started at, message) and the children waiting to restart; a layer-m
    tier's leaf children: their next job and the version each started at."""

    node: Node
    parent: Tier | None
    slot: int          # its position among the parent's children
    x: np.ndarray
    s: np.ndarray
    up: float          # seconds of its message to its parent
    down: float        # seconds of the parent's model to it
    version: int = 0
    paused: bool = False
    done: int = 0
    job: int = 0
    since: int = 0
    buffer: list = field(default_factory=list)
    waiting: list = field(default_factory=list)
    jobs: list = field(default_factory=list)
    started: list = field(default_factory=list)


def build_tree(spec, branching=None) -> Node:
    if branching is not None:
        spec = branching[-1]
        for b in reversed(branching[:-1]):
            spec = [spec] * b
    depth = 1
    s = spec
    while isinstance(s, list):
        depth += 1
        s = s[0]
    counters = [0] * (depth + 1)
    next_device = [0]

    def make(x, layer):
        node = Node(layer, counters[layer])
        counters[layer] += 1
        if layer == 1:
            for _ in range(x):
                d = next_device[0]
                next_device[0] += 1
                node.children.append(Node(0, counters[0], devices=[d]))
                counters[0] += 1
                node.devices.append(d)
        else:
            for c in x:
                child = make(c, layer - 1)
                node.children.append(child)
                node.devices.extend(child.devices)
        return node

    return make(spec, depth)


def gen(*key):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class Reference:
    def __init__(self, root: Node, tau, levels, bucket, lr, batch, seed, model, train_data, samples=None,
                 kinds=None, fraction=None, availability=None, weighting="renormalize", server=None,
                 error_feedback=None, downlink=None, client=None, lr_at=None, tensor_sizes=None, fractions=None,
                 clock=None, intsum=None):
        self.root, self.tau, self.lr, self.batch, self.seed = root, tau, lr, batch, seed
        N = len(levels)
        kinds = kinds or ["qsgd"] * N
        fractions = fractions or [0.01] * N
        self.codecs = [make_codec(s, bucket, k, tensor_sizes=tensor_sizes, fraction=f, **(intsum or {}))
                       for s, k, f in zip(levels, kinds, fractions)]
        self.model = model
        self.params = list(model.parameters())
        self.data = train_data
        self.samples = samples
        self.calls = {}
        self.fraction = fraction or [1.0] * N
        self.availability = availability or [1.0] * N
        self.weighting = weighting
        # server[n-1] = (kind, dict of parameters) with kind in avg, momentum, adam, yogi
        self.server = server or [("avg", {})] * N
        self.server_state = {}
        self.error_feedback = error_feedback or [False] * N
        self.residual = {}
        self.downlink = [make_codec(s, bucket, "qsgd", tensor_sizes=tensor_sizes) if s else None
                         for s in (downlink or [0] * N)]
        self.client = client or {}
        self.admm, self.duals = 0.0, {}  # ADMM: rho, each child's dual (set by reference_for)
        self.admm_layer, self.anchor = 1, None  # ADMM's layer; above 1, the anchor of the subtree now training
        self.lr_at = lr_at or (lambda t: self.lr)
        self.clock = clock  # a Clock: the system model and the policies; None = everyone is kept
        self.kept = {}      # (layer, node, call) -> positions kept, from the clock's pass
        self.virtual_time = 0.0
        self.parents = []   # every device's edge in every round (with moves)
        self.only = None    # a leaf job of a buffered tier (then the root): the one child of the root that takes part
        self.buffered = None  # {layer: (k, staleness function)} of the buffered layers (a top segment m..N)
        self.moves = None   # a Moves: every device's edge in a round (devices that move, edges that fail)
        self.privacy = None  # {clip, sigma, layer (0: local), kappa}: docs/privacy.md
        self.omega = {}     # (layer, node) -> the largest weight of a device in its last sum
        self.base = root

    def vector(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).numpy().copy()

    def load(self, v: np.ndarray) -> None:
        off = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(torch.from_numpy(v[off:off + p.numel()].copy()).view_as(p))
                off += p.numel()

    def count(self, key):
        k = self.calls.get(key, 0)
        self.calls[key] = k + 1
        return k

    def local_sgd(self, device, v, t):
        call = self.count(("train", device))
        self.load(v)
        x, y = self.data[device]
        n = len(y)
        b = min(self.batch, n)
        g = gen(self.seed, 3, device, t, call)
        need = self.tau[0] * b
        order = np.concatenate([g.permutation(n) for _ in range(math.ceil(need / n))])[:need].reshape(self.tau[0], b)
        lr = self.lr_at(t)
        if self.anchor is not None:  # ADMM above the edges: the subtree's prox toward its anchor, no dual here
            sgd_run(self.model, self.params, x, y, order, lr, **{**self.client, "prox_mu": self.admm},
                    w0=self.anchor)
            return self.vector()
        if self.admm and self.admm_layer == 1:  # FedADMM at the edges: prox toward v - y / rho, the dual step
            rho, dual = self.admm, self.duals.get(device)
            inv = np.float32(1.0 / rho)
            anchor = v.copy() if dual is None else v - dual * inv
            sgd_run(self.model, self.params, x, y, order, lr, **{**self.client, "prox_mu": rho}, w0=anchor)
            xs = self.vector()
            dual = np.float32(rho) * (xs - v) if dual is None else dual + np.float32(rho) * (xs - v)
            self.duals[device] = dual
            return xs + dual * inv
        if self.client:
            sgd_run(self.model, self.params, x, y, order, lr, **self.client)
            return self.vector()
        for s in range(self.tau[0]):
            idx = torch.from_numpy(order[s])
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                for p, gr in zip(self.params, grads):
                    p.add_(gr, alpha=-lr)
        return self.vector()

    def size(self, node):
        if self.samples is None:
            return len(node.devices)
        return sum(int(self.samples[d]) for d in node.devices)

    def work(self, c, v, t):
        if c.layer == 0:
            return self.local_sgd(c.devices[0], v, t)
        reps = self.tau[c.layer]
        for k in range(reps):
            v = self.aggregate(c, v, t, down=k < reps - 1)
        return v

    def chosen(self, u, t, call):
        """Positions of the children of u that take part, and their weights."""
        if self.only is not None and u is self.root:  # one job of a buffered cloud: that child alone
            return [self.only], [np.float32(1)]
        n, C = u.layer, len(u.children)
        f, p = self.fraction[n - 1], self.availability[n - 1]
        picked = list(range(C))
        m = C
        if f < 1:
            m = max(1, math.floor(Fraction(repr(f)) * C + Fraction(1, 2)))
            picked = sorted(int(j) for j in gen(self.seed, 8, n, u.index, t, call).choice(C, size=m, replace=False))
        if p < 1:
            up = gen(self.seed, 9, n, u.index, t, call).random(C) < p
            picked = [j for j in picked if up[j]]
        if n > 1:  # a child node with no device in this round's tree sends nothing
            picked = [j for j in picked if u.children[j].devices]
        return picked, self.weights_of(u, picked, m)

    def weights_of(self, u, picked, m):
        n, C = u.layer, len(u.children)
        f, p = self.fraction[n - 1], self.availability[n - 1]
        sizes = [float(self.size(c)) for c in u.children]
        if self.weighting == "unbiased" and (f < 1 or p < 1):
            pi = m / C * p
            w = [sizes[j] / sum(sizes) / pi for j in picked]
        else:
            total = sum(sizes[j] for j in picked)
            w = [sizes[j] / total if total > 0 else 0.0 for j in picked]
        return [np.float32(x) for x in w]

    def sample_count(self, u):
        f, C = self.fraction[u.layer - 1], len(u.children)
        return max(1, math.floor(Fraction(repr(f)) * C + Fraction(1, 2))) if f < 1 else C

    def server_step(self, n, u, v, g):
        kind, par = self.server[n - 1]
        one = np.float32(1)
        if kind == "avg":
            return v + g
        st = self.server_state.setdefault((n, u.index), {"m": np.zeros_like(v), "s": np.zeros_like(v)})
        if kind == "momentum":
            st["m"] = st["m"] * np.float32(par.get("momentum", 0.9)) + g
            return v + np.float32(par.get("lr", 1.0)) * st["m"]
        b1, b2 = (np.float32(b) for b in par.get("betas", (0.9, 0.99)))
        lr, eps = np.float32(par.get("lr", 0.01)), np.float32(par.get("eps", 1e-3))
        st["m"] = st["m"] * b1 + (one - b1) * g
        g2 = g * g
        if kind == "adam":
            st["s"] = st["s"] * b2 + (one - b2) * g2
        else:  # yogi
            st["s"] = st["s"] - (one - b2) * g2 * np.sign(st["s"] - g2)
        return v + lr * st["m"] / (np.sqrt(st["s"]) + eps)

    def skip(self, c, t):
        """A child drawn but not kept: its subtree's counters advance as if it had worked, nothing is trained."""
        if c.layer == 0:
            self.count(("train", c.devices[0]))
            return
        for _ in range(self.tau[c.layer]):
            call = self.count(("agg", c.layer, c.index))
            picked, _ = self.chosen(c, t, call)
            for j in picked:
                self.skip(c.children[j], t)
                self.count(("up", c.layer, c.children[j].index))

    def private_update(self, device, x, v, t):
        """DP-FedAvg at the device (docs/privacy.md): the update clipped to L2 norm C, plus N(0, (sigma C)^2) when
        the noise is local (keyed by the device's training call of this run)."""
        p, clip = self.privacy, self.clip_now
        u = x - v
        norm = float(np.sqrt(np.dot(u.astype(np.float64), u.astype(np.float64))))
        self.counted[0] += norm <= clip
        self.counted[1] += 1
        u = u * np.float32(1.0 if norm <= clip else clip / norm)
        if p["layer"] == 0:
            call = self.calls[("train", device)] - 1
            u = u + gen(self.seed, 13, 0, device, t, call).standard_normal(v.size, dtype=np.float32) \
                * np.float32(self.update_sigma() * clip)
            self.count_draw(0, device, t, call)
        return u

    def uplink(self, n, index, x, v, key):
        """The message of child ``index`` on link n: x relative to v (error feedback: plus its residual)."""
        codec = self.codecs[n - 1]
        if not self.error_feedback[n - 1]:
            return codec.encode(x, v, key)
        z = (x - v) + self.residual.get((n, index), np.zeros_like(v))
        msg = codec.encode(z, np.zeros_like(v), key)
        self.residual[(n, index)] = z - codec.decode(msg, v.size)
        return msg

    def aggregate(self, u, v, t, down=True):
        n = u.layer
        call = self.count(("agg", n, u.index))
        picked, weights = self.chosen(u, t, call)
        kept = self.kept.get((n, u.index, call), picked) if self.clock else picked
        if kept != picked:
            weights = self.weights_of(u, kept, self.sample_count(u))
        if not kept:
            for j in picked:
                self.skip(u.children[j], t)
                self.count(("up", n, u.children[j].index))
            self.omega[(n, u.index)] = 0.0
            return v
        acc = np.zeros_like(v)
        codec = self.codecs[n - 1]
        weight_of = dict(zip(kept, weights))
        codes = [] if getattr(codec, "bits", None) else None  # intsum: integer codes added up
        for j in picked:
            c = u.children[j]
            if j not in weight_of:
                self.skip(c, t)
                self.count(("up", n, c.index))
                continue
            a = weight_of[j]
            if self.admm and n == self.admm_layer > 1:  # FedADMM with subtrees: c trains toward its anchor
                rho, dual = np.float32(self.admm), self.duals.get(c.index)
                self.anchor = v.copy() if dual is None else v - dual * np.float32(1.0 / self.admm)
                x = self.work(c, v, t)
                self.anchor = None
                dual = rho * (x - v) if dual is None else dual + rho * (x - v)
                self.duals[c.index] = dual
                x = x + dual * np.float32(1.0 / self.admm)
            else:
                x = self.work(c, v, t)
            k = self.count(("up", n, c.index))
            base = v
            if self.privacy and c.layer == 0:  # the device's update clipped (and, local placement, noised)
                x, base = self.private_update(c.devices[0], x, v, t), np.zeros_like(v)
            if codes is not None:
                q = codec.codes(x - base, float(a), (self.seed, 4, n, c.index, t, k), (self.seed, 14, n, u.index, t, call))
                if self.privacy and self.privacy.get("shares"):  # distributed DP: the device's discrete share
                    p, device = self.privacy, c.devices[0]
                    omega = max(float(weight_of[i]) for i in kept)
                    std = p["sigma"] * (omega * p["clip"] * codec.scale + math.sqrt(q.size)) / math.sqrt(p["shares"])
                    share = discrete_gaussian(gen(self.seed, 13, 0, device, t, self.calls[("train", device)] - 1),
                                              std, q.size)
                    q = ((q.astype(np.int64) + share) % (1 << codec.bits)).astype(np.uint64)
                codes.append(q)
                continue
            msg = self.uplink(n, c.index, x, base, (self.seed, 4, n, c.index, t, k))
            codec.decode_add(msg, a, acc)
        if codes is not None:  # the sum in Python integers, read back as signed codes / gamma
            total = np.array([sum(int(q[i]) for q in codes) % (1 << codec.bits) for i in range(codes[0].size)],
                             dtype=np.uint64)
            acc = codec.decode_sum(total, v.size, (self.seed, 14, n, u.index, t, call))
        if self.privacy:  # the largest weight of a device in this sum; the noise at the privacy layer
            self.omega[(n, u.index)] = max(
                float(weight_of[j]) * (1.0 if n == 1 else self.omega[(n - 1, u.children[j].index)]) for j in kept)
            if n == self.privacy["layer"] and not self.privacy.get("shares"):
                p = self.privacy
                std = self.update_sigma() * self.clip_now * p["kappa"] * self.omega[(n, u.index)]
                self.count_draw(n, u.index, t, call)
                acc = acc + gen(self.seed, 13, n, u.index, t, call).standard_normal(v.size, dtype=np.float32) \
                    * np.float32(std)
        new = self.server_step(n, u, v, acc)
        dl = self.downlink[n - 1]
        if down and dl is not None:
            msg = dl.encode(new, v, (self.seed, 10, n, u.index, t, call))
            new = v.copy()
            dl.decode_add(msg, np.float32(1), new)
        return new

    def run_tiered(self, rounds):
        """Buffered tiers on the top layers m..N (core/tiers.py's docstring is the specification) in plain loops.
        Every node of layers m..N buffers what its children send and updates every k_n arrivals, weighted by its
        share of the buffer's sizes times s(versions behind).  A layer-m node's children work in jobs: one
        synchronous round of the node's subtree with that child alone, its counters offset as if the child's
        earlier jobs of that round had happened.  A higher node's children are tiers: a job adopts the parent's
        newest model, does tau updates, sends its delta up and pauses until it adopts again (``down`` seconds after
        its message arrived, and not while the parent is paused).  Events in (time, phase, layer, node, child,
        insertion) order: every arrival at an instant, then every adoption, then every job start.  m = N is the
        buffered cloud."""
        root, N = self.root, self.root.layer
        m = min(self.buffered)
        assert sorted(self.buffered) == list(range(m, N + 1)), "the buffered layers must be a top segment"
        w0 = self.vector()
        P = math.prod(self.tau[m:])  # a leaf child's jobs per round: tau_(m+1) .. tau_N
        tiers = {}                   # (layer, node index) -> its Tier

        def make(node, parent, slot):
            n, up, down = node.layer, 0.0, 0.0
            if parent is not None and self.clock is not None:  # link n + 1: list entry n
                ck = self.clock
                up = ck.up_bits[n] / ck.up_rate[n] + ck.up_latency[n]
                down = (ck.down_bits[n] / ck.down_rate[n] if ck.down_rate[n] else 0.0) + ck.down_latency[n]
            tier = Tier(node, parent, slot, w0.copy(), w0.copy(), up, down)
            tiers[(n, node.index)] = tier
            if n == m:
                tier.jobs, tier.started = [0] * len(node.children), [0] * len(node.children)
            else:
                for pos, c in enumerate(node.children):
                    make(c, tier, pos)

        make(root, None, -1)
        cloud = tiers[(N, root.index)]
        per_round = -(-len(root.children) // self.buffered[N][0])
        heap, seq = [], [0]
        pending = {}    # (layer, node index, position) -> the message on its way to that tier from that child
        ended = [0]     # rounds ended

        def push(time, phase, tier, pos):
            heapq.heappush(heap, (time, phase, tier.node.layer, tier.node.index, pos, seq[0]))
            seq[0] += 1

        def leaf_job(tier, pos, now):
            """Job ``tier.jobs[pos]`` of child ``pos`` of a layer-m tier, from its model: (seconds, message)."""
            u = tier.node
            c = u.children[pos]
            t, r = divmod(tier.jobs[pos], P)

            def preset():  # the counters of round t after r earlier jobs of this child
                self.calls = {("up", m, c.index): r, ("agg", m, u.index): r}
                for d in c.devices:
                    self.calls[("train", d)] = r * math.prod(self.tau[1:m])
                todo = [c] if c.layer >= 1 else []
                while todo:
                    x = todo.pop()
                    a = r * math.prod(self.tau[x.layer:m])
                    self.calls[("agg", x.layer, x.index)] = a
                    for y in x.children:
                        self.calls[("up", x.layer, y.index)] = a
                        if y.layer >= 1:
                            todo.append(y)

            saved, self.root, self.only = self.root, u, pos
            preset()
            seconds = self.clock.time_round(self, t, now) if self.clock is not None else 0.0
            preset()
            v = tier.x
            x = self.work(c, v, t)
            msg = self.uplink(m, c.index, x, v, (self.seed, 4, m, c.index, t, self.count(("up", m, c.index))))
            self.root, self.only = saved, None
            return seconds, msg

        def send(tier):
            """Tier ``tier`` (not the cloud) sends its job's delta to its parent."""
            n, u = tier.node.layer, tier.node.index
            t, r = divmod(tier.job, math.prod(self.tau[n + 1:]))  # the parent's updates per round
            p = tier.parent.node
            pending[(p.layer, p.index, tier.slot)] = self.uplink(n + 1, u, tier.x, tier.s,
                                                                  (self.seed, 4, n + 1, u, t, r))

        def flush(tier, now):
            """Apply the first k buffered messages while the tier may; True when the last round has ended."""
            u, n = tier.node, tier.node.layer
            k, stale = self.buffered[n]
            codec = self.codecs[n - 1]
            while not tier.paused and len(tier.buffer) >= k:
                taken, tier.buffer = tier.buffer[:k], tier.buffer[k:]
                total = sum(self.size(u.children[pos]) for pos, _, _ in taken)
                acc = np.zeros_like(tier.x)
                for pos, v, msg in taken:
                    share = self.size(u.children[pos]) / total if total > 0 else 0.0
                    codec.decode_add(msg, np.float32(share * stale(tier.version - v)), acc)
                tier.x = self.server_step(n, u, tier.x, acc)
                tier.version += 1
                if tier.parent is None:
                    if tier.version % per_round == 0:
                        ended[0] += 1
                        self.virtual_time = now
                        if ended[0] == rounds:
                            return True
                    continue
                tier.done += 1
                if tier.done == self.tau[n]:
                    tier.done, tier.paused = 0, True
                    send(tier)
                    tier.job += 1
                    push(now + tier.up, ARRIVE, tier.parent, tier.slot)
            return False

        def restart(tier, pos, now):
            if tier.node.layer == m:
                push(now, START, tier, pos)
            else:
                c = tiers[(tier.node.layer - 1, tier.node.children[pos].index)]
                push(now + c.down, ADOPT, c, -1)

        for tier in tiers.values():
            if tier.node.layer == m:
                for pos in range(len(tier.node.children)):
                    push(0.0, START, tier, pos)
        while heap:
            now, phase, layer, index, pos, _ = heapq.heappop(heap)
            tier = tiers[(layer, index)]
            if phase == ARRIVE:
                if layer == m:
                    v = tier.started[pos]
                else:
                    v = tiers[(layer - 1, tier.node.children[pos].index)].since
                tier.buffer.append((pos, v, pending.pop((layer, index, pos))))
                if flush(tier, now):
                    return cloud.x
                if layer == m:
                    tier.jobs[pos] += 1
                restart(tier, pos, now)
            elif phase == ADOPT:
                parent = tier.parent
                if parent.paused:
                    parent.waiting.append(tier.slot)
                    continue
                tier.version += 1
                tier.since, tier.paused = parent.version, False
                tier.x, tier.s = parent.x.copy(), parent.x.copy()
                if flush(tier, now):
                    return cloud.x
                if not tier.paused:
                    waiting, tier.waiting = sorted(tier.waiting), []
                    for p in waiting:
                        restart(tier, p, now)
            else:  # START of a leaf job
                if tier.paused:
                    tier.waiting.append(pos)
                    continue
                tier.started[pos] = tier.version
                seconds, pending[(layer, index, pos)] = leaf_job(tier, pos, now)
                push(now + seconds, ARRIVE, tier, pos)
        raise RuntimeError(f"the buffered tiers stopped after {ended[0]} of {rounds} rounds (a buffer never fills)")

    def run(self, rounds):
        if self.buffered:
            return self.run_tiered(rounds)
        w = self.vector()
        for t in range(rounds):
            if self.moves:
                self.root = moment(self.base, self.moves.edges(t, self.virtual_time))
                self.parents.append(list(self.moves.now))
            if self.clock:
                self.calls = {}
                self.virtual_time += self.clock.time_round(self, t, self.virtual_time)
            self.calls = {}
            self.counted = [0, 0, []]  # adaptive clipping: updates within the clip, all, the count's noise draws
            w = self.aggregate(self.root, w, t)
            p = self.privacy
            if p and p.get("quantile") and self.counted[1]:  # C <- C exp(-lr (b - q)), b the noised fraction within
                b = (self.counted[0] + math.fsum(self.counted[2])) / self.counted[1]
                self.clip_now *= math.exp(-p["clip_lr"] * (b - p["quantile"]))
        return w

    def update_sigma(self):
        """The update's noise multiplier: sigma, or with adaptive clipping (sigma^-2 - (2 sigma_b)^-2)^-1/2."""
        p = self.privacy
        if not p.get("quantile") or not p["sigma"]:
            return p["sigma"]
        return 1.0 / math.sqrt(p["sigma"] ** -2 - (2.0 * p["count_std"]) ** -2)

    def count_draw(self, *key):
        """Adaptive clipping: one party's noise on its count of updates within the clip."""
        if self.privacy.get("quantile") and self.privacy["count_std"]:
            self.counted[2].append(float(gen(self.seed, 16, *key).standard_normal()) * self.privacy["count_std"])


def moment(node, edge_of):
    """The tree with every device under its edge of the moment (edge_of[d]; -1: nowhere)."""
    if node.layer == 1:
        ds = [d for d in range(len(edge_of)) if edge_of[d] == node.index]
        return Node(1, node.index, [Node(0, d, devices=[d]) for d in ds], ds)
    kids = [moment(c, edge_of) for c in node.children]
    return Node(node.layer, node.index, kids, [d for c in kids for d in c.devices])


class Moves:
    """Devices that move (random uniform or ring, markov, trace) and edge servers that fail, in plain loops."""

    def __init__(self, root, seed, model, p=0.0, neighbours="uniform", matrix=None, rows=(), outages=(),
                 unit="rounds", fallback="nearest"):
        self.edges_of_tree = []
        self.parent = {}
        def walk(node, parent):
            if node.layer == 1:
                self.parent[node.index] = parent
                self.edges_of_tree += [node.index] * len(node.devices)
            for c in node.children:
                walk(c, node.index if node.layer == 2 else parent)
        walk(root, 0)
        self.E = len(self.parent)
        self.seed, self.model, self.p, self.neighbours = seed, model, p, neighbours
        self.matrix, self.rows = matrix, sorted(rows, key=lambda r: (r[0], r[1]))
        self.outages, self.unit, self.fallback = list(outages), unit, fallback
        self.own, self.round, self.now = list(self.edges_of_tree), 0, None
        for r, d, e in self.rows:
            if r == 0:
                self.own[d] = e

    def step(self, t):
        k0, k1 = key_words((self.seed, 12, t))
        out = list(self.own)
        for d, cur in enumerate(self.own):
            if self.model == "trace" or cur < 0:
                continue
            move = float(uniforms_at(k0, k1, np.array([2 * d]))[0]) + 2.0 ** -25
            where = float(uniforms_at(k0, k1, np.array([2 * d + 1]))[0]) + 2.0 ** -25
            if self.model == "markov":
                acc, new = 0.0, 0
                for e in range(self.E):
                    acc += self.matrix[cur][e]
                    if acc < where:
                        new = e + 1
                out[d] = min(new, self.E - 1)
            elif move < self.p:
                if self.neighbours == "ring":
                    out[d] = (cur + (-1 if where < 0.5 else 1)) % self.E
                else:
                    k = min(int(where * (self.E - 1)), self.E - 2)
                    out[d] = k + (1 if k >= cur else 0)
        for r, d, e in self.rows:
            if r == t:
                out[d] = e
        self.own = out

    def edges(self, t, t0):
        while self.round < t:
            self.round += 1
            self.step(self.round)
        x = t if self.unit == "rounds" else t0
        down = {e for e, a, b, _ in self.outages if a <= x < b}
        named = {e: f for e, a, b, f in self.outages if a <= x < b and f is not None}

        def nearest(e):
            alive = [s for s in range(self.E) if self.parent[s] == self.parent[e] and s not in down]
            return min(alive, key=lambda s: (abs(s - e), s)) if alive else -1

        def target(e):
            if e not in down:
                return e
            to = named.get(e, -1 if self.fallback == "sit_out" else nearest(e))
            if to >= 0 and to in down:
                to = -1 if self.fallback == "sit_out" else nearest(to)
            return to

        self.now = [target(e) for e in self.own]
        return self.now


class Clock:
    """The virtual clock and the policies in plain loops (docs/system.md): per device its seconds per step
    (``latency.step_time`` times a lognormal factor drawn once, times a lognormal jitter per round), per link a
    constant uplink rate and latency, a constant downlink rate (0: no time) and latency; availability intervals
    per device; per layer ``(policy, deadline, min_children, k)``."""

    def __init__(self, seed, devices, step_time, speed_sigma, jitter_sigma, up_rate, up_latency, down_rate,
                 down_latency, up_bits, down_bits, policies, intervals=None):
        u = gen(seed, 11, 0).random((2, devices))
        self.step = [step_time * f for f in (np.exp(speed_sigma * np.sqrt(-2.0 * np.log(1.0 - u[0]))
                                                    * np.cos(2.0 * np.pi * u[1])) if speed_sigma else [1.0] * devices)]
        self.seed, self.jitter_sigma = seed, jitter_sigma
        self.up_rate, self.up_latency, self.down_rate, self.down_latency = up_rate, up_latency, down_rate, down_latency
        self.up_bits, self.down_bits, self.policies = up_bits, down_bits, policies
        self.intervals = intervals or {}
        self.secure_threshold = 0  # secure aggregation at the edges: the fewest survivors a key group sums

    def jitter(self, d, t):
        if not self.jitter_sigma:
            return 1.0
        k0, k1 = key_words((self.seed, 11, 1, t))
        u1 = float(uniforms_at(k0, k1, np.array([2 * d]))[0]) + 2.0 ** -25
        u2 = float(uniforms_at(k0, k1, np.array([2 * d + 1]))[0]) + 2.0 ** -25
        return float(np.exp(self.jitter_sigma * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)))

    def online(self, d, when):
        spans = self.intervals.get(d)
        return spans is None or any(a <= when < b for a, b in spans)

    def time_round(self, ref, t, t0):
        """Time round ``t`` (starting at ``t0``), fill ``ref.kept``; returns the round's duration."""
        ref.kept = {}

        def timing(u, start):
            n = u.layer
            call = ref.count(("agg", n, u.index))
            picked, _ = ref.chosen(u, t, call)
            if n == 1:
                picked = [j for j in picked if self.online(u.children[j].devices[0], t0 + start)]
            arrive = []
            for j in picked:
                c = u.children[j]
                down = 0.0 if not self.down_rate[n - 1] else self.down_bits[n - 1] / self.down_rate[n - 1]
                ready = start + (down + self.down_latency[n - 1])
                if c.layer == 0:
                    d = c.devices[0]
                    ready = ready + ref.tau[0] * (self.step[d] * self.jitter(d, t))
                else:
                    for _ in range(ref.tau[c.layer]):
                        ready = timing(c, ready)
                arrive.append(ready + (self.up_bits[n - 1] / self.up_rate[n - 1] + self.up_latency[n - 1]))
            if not picked:
                ref.kept[(n, u.index, call)] = []
                return start
            policy, deadline, min_children, k = self.policies[n - 1]
            order = sorted(range(len(picked)), key=lambda i: (arrive[i], i))
            if policy == "first_k":
                keep = order[:min(k, len(order))]
                end = arrive[keep[-1]]
            elif policy == "deadline":
                keep = [i for i in range(len(picked)) if arrive[i] <= start + deadline]
                if len(keep) == len(picked):
                    end = max(arrive)
                elif len(keep) >= min(min_children, len(picked)):
                    end = start + deadline
                else:
                    keep = order[:min(min_children, len(picked))]
                    end = arrive[keep[-1]]
            else:
                keep, end = list(range(len(picked))), max(arrive)
            if n == 1 and len(keep) < self.secure_threshold:  # a secure key group with too few survivors aborts
                keep = []
            ref.kept[(n, u.index, call)] = sorted(picked[i] for i in keep)
            return end

        return timing(ref.root, 0.0)


def reference_for(cfg) -> Reference:
    """The reference set up for a config (its tree, codecs, options and data, built by the engine's
    builders: the data and the initial model are inputs, not what is tested)."""
    from qmlhfl_mpi.config import build
    from qmlhfl_mpi.config.schema import server_betas

    tree = cfg.build_tree()
    data = build.local_data(cfg, tree, range(tree.num_devices), 0, 1)
    model = build.model(cfg, data.input_shape, data.num_classes)
    topo = cfg.topology
    def lists(x):
        return [lists(c) for c in x] if isinstance(x, (list, tuple)) else x

    root = build_tree(lists(topo.tree), list(topo.branching) if topo.branching else None)
    q, t, s, N = cfg.quantizer, cfg.train, cfg.server, cfg.N
    server = []
    betas = server_betas(s.betas, N)
    for n in range(N):
        par = {"betas": betas[n]}
        for key in ("lr", "momentum", "eps"):
            if getattr(s, key):
                par[key] = getattr(s, key)[n]
        server.append((s.optimizer[n] if s.optimizer else "avg", par))
    client = {k: getattr(t, k) for k in ("momentum", "nesterov", "weight_decay", "prox_mu") if getattr(t, k)}
    schedule = build.lr_schedule(cfg)
    sizes = tuple(p.numel() for p in model.parameters())
    ref = Reference(
        root, cfg.tau, q.levels, q.bucket, t.lr, t.batch_size, t.seed, model, data.train,
        data.samples if topo.weighting == "samples" else None,
        kinds=list(q.kind) or None, fraction=list(cfg.participation.fraction) or None,
        availability=list(cfg.participation.availability) or None, weighting=cfg.participation.weighting,
        server=server, error_feedback=list(q.error_feedback) or None, downlink=list(q.downlink) or None,
        client=client, lr_at=schedule.at if schedule else None,
        tensor_sizes=sizes, fractions=list(q.topk_fraction) or None, clock=clock_for(cfg, tree.num_devices, sizes),
        intsum=intsum_args(cfg, sum(sizes)))
    ref.parents = []
    ref.admm, ref.duals, ref.admm_layer = (cfg.admm.rho if cfg.admm.layer else 0.0), {}, max(cfg.admm.layer, 1)
    if ref.clock is not None and cfg.privacy.secure_aggregation and cfg.privacy.secure_aggregation[0]:
        ref.clock.secure_threshold = cfg.privacy.secure_threshold
    ag = cfg.aggregation
    if "buffered" in ag.policy:
        ref.buffered = {n: (ag.buffer[n - 1], staleness_function(ag.staleness[n - 1] if ag.staleness else "constant"))
                        for n in range(1, N + 1) if ag.policy[n - 1] == "buffered"}
    p = cfg.privacy
    if p.clip > 0:  # kappa: the link-1 qsgd codec moves a coordinate by at most one level of its bucket's norm
        layer = {"local": 0, "edge": p.layer, "central": cfg.N, "distributed": 1}[p.placement]
        d, s1 = sum(sizes), q.levels[0]
        blen = d if not q.bucket or q.bucket >= d else q.bucket
        kappa = 1.0 if layer == 0 or s1 == 0 else 1.0 + math.sqrt(blen) / s1
        ref.privacy = {"clip": p.clip, "sigma": p.noise_multiplier, "layer": layer, "kappa": kappa,
                       "shares": p.secure_threshold if p.placement == "distributed" else 0,
                       "quantile": p.clip_quantile, "clip_lr": p.clip_lr,
                       "count_std": p.clip_count_noise or p.noise_multiplier}
        ref.clip_now = p.clip
    m, f = cfg.mobility, cfg.failures
    if m.model != "static" or f.intervals:
        assert m.neighbours in ("uniform", "ring") and not f.trace
        matrix = rows = None
        if m.model == "markov":
            with open(m.matrix) as fh:
                rows_ = [line.split("#")[0].replace(",", " ").split() for line in fh]
            matrix = [[float(x) for x in r] for r in rows_ if r]
        if m.model == "trace":
            import csv
            with open(m.trace) as fh:
                rows = [(int(r["round"]), int(r["device"]), int(r["edge"])) for r in csv.DictReader(fh)]
        outages = [(int(r[0]), float(r[1]), float(r[2]), int(r[3]) if len(r) > 3 else None) for r in f.intervals]
        ref.moves = Moves(root, cfg.train.seed if m.seed is None else m.seed, m.model, m.p, m.neighbours, matrix,
                          rows or (), outages, f.unit, f.fallback)
    return ref


def staleness_function(text):
    """constant, polynomial(a): (1 + s)^-a, hinge(a, b): 1 for s <= b else 1 / (a (s - b) + 1)."""
    name, _, rest = text.replace(" ", "").partition("(")
    args = [float(x) for x in rest.rstrip(")").split(",")] if rest else []
    if name == "polynomial":
        return lambda s: (1.0 + s) ** -args[0]
    if name == "hinge":
        return lambda s: 1.0 if s <= args[1] else 1.0 / (args[0] * (s - args[1]) + 1.0)
    return lambda s: 1.0


def _sigma(text):
    """The sigma of 'lognormal(s)' (0 for 'constant'): the reference knows these two forms only."""
    if text == "constant":
        return 0.0
    assert text.startswith("lognormal(") and text.endswith(")"), text
    return float(text[len("lognormal("):-1])


def clock_for(cfg, devices, sizes):
    """The reference's :class:`Clock` for a config with a ``system`` or ``aggregation`` section (else None)."""
    import csv

    sy, ag, N = cfg.system, cfg.aggregation, cfg.N
    if not (ag.policy or sy.availability_trace or sy.speed != "constant" or sy.jitter != "constant" or sy.down_rate):
        return None
    assert not (sy.link_spread or sy.contention or sy.device_trace or sy.link_trace or sy.availability_period)
    d = sum(sizes)
    q = cfg.quantizer
    up = [make_codec(s_, q.bucket, k, tensor_sizes=sizes, fraction=f).nbytes(d) * 8
          for s_, k, f in zip(q.levels, q.kind or ["qsgd"] * N, q.topk_fraction or [0.01] * N)]
    down = [8 * (make_codec(s_, q.bucket, "qsgd", tensor_sizes=sizes).nbytes(d) if s_ else 4 * d)
            for s_ in (q.downlink or [0] * N)]
    intervals = {}
    if sy.availability_trace:
        with open(sy.availability_trace) as fh:
            for row in csv.DictReader(fh):
                intervals.setdefault(int(row["device"]), []).append((float(row["online"]), float(row["offline"])))
    lat = cfg.latency
    policies = [((ag.policy[n] if ag.policy else "all"), (ag.deadline[n] if ag.deadline else 0.0),
                 (ag.min_children[n] if ag.min_children else 1), (ag.k[n] if ag.k else 1)) for n in range(N)]
    return Clock(cfg.train.seed if sy.seed is None else sy.seed, devices, lat.step_time, _sigma(sy.speed), _sigma(sy.jitter),
                 list(lat.uplink_rate or [1e8] * N), list(lat.uplink_latency or [0.01] * N),
                 list(sy.down_rate or [0.0] * N), list(sy.down_latency or [0.0] * N), up, down, policies, intervals)


def intsum_args(cfg, d=0):
    """An intsum link 1's scale and rotation: the given scale, or the largest gamma with gamma C A + m <= 2^(b-1) - 1
    (m the most children an edge samples, A = 1 for renormalised weights, else the most children); distributed DP
    keeps 8 standard deviations of the group's noise, 8 sigma sqrt(m / t) (gamma C + sqrt(d')), inside too."""
    q = cfg.quantizer
    if not q.kind or q.kind[0] != "intsum":
        return None
    edges = build_tree(cfg.topology.tree if cfg.topology.tree is not None else None,
                       list(cfg.topology.branching) if cfg.topology.branching else None)
    most = max(len(e.children) for e in walk_layer(edges, 1))
    m = most
    if cfg.participation.fraction and cfg.participation.fraction[0] < 1:
        m = min(most, max(1, math.floor(Fraction(repr(cfg.participation.fraction[0])) * most + Fraction(1, 2))))
    A = 1.0 if cfg.participation.weighting == "renormalize" else float(most)
    rotate = bool(q.rotate[0]) if q.rotate else False
    p = cfg.privacy
    h = 8 * p.noise_multiplier * math.sqrt(m / p.secure_threshold) if p.placement == "distributed" else 0.0
    codes = 2 ** math.ceil(math.log2(d)) if rotate and d > 1 else d
    scale = (q.scale[0] if q.scale else 0) or ((1 << (q.levels[0] - 1)) - 1 - m - h * math.sqrt(codes)) / (
        p.clip * (A + h))
    return {"scale": scale, "rotate": rotate}


def walk_layer(node, layer):
    if node.layer == layer:
        return [node]
    return [x for c in node.children for x in walk_layer(c, layer)]

