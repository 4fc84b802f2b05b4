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
The options (sampling, availability, server optimisers, error feedback,
downlink quantization, the client optimiser) follow docs/algorithm.md section 5 and
docs/algorithms.md, written again here as plain loops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from qmlhfl_mpi.core.codecs import make_codec

try:
    from reference_client import sgd_run
except ImportError:  # pragma: no cover - the module lives beside this one in tests/
    sgd_run = None


@dataclass
class Node:
    layer: int
    index: int
    children: list[Node] = field(default_factory=list)
    devices: list[int] = field(default_factory=list)


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
                 error_feedback=None, downlink=None, client=None, lr_at=None, tensor_sizes=None, fractions=None):
        self.root, self.tau, self.lr, self.batch, self.seed = root, tau, lr, batch, seed
        N = len(levels)
        kinds = kinds or ["qsgd"] * N
        fractions = fractions or [0.01] * N
        self.codecs = [make_codec(s, bucket, k, tensor_sizes=tensor_sizes, fraction=f)
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
        self.lr_at = lr_at or (lambda t: self.lr)

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
        sizes = [float(self.size(c)) for c in u.children]
        if self.weighting == "unbiased" and (f < 1 or p < 1):
            pi = m / C * p
            w = [sizes[j] / sum(sizes) / pi for j in picked]
        else:
            total = sum(sizes[j] for j in picked)
            w = [sizes[j] / total for j in picked]
        return picked, [np.float32(x) for x in w]

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

    def aggregate(self, u, v, t, down=True):
        n = u.layer
        call = self.count(("agg", n, u.index))
        picked, weights = self.chosen(u, t, call)
        if not picked:
            return v
        acc = np.zeros_like(v)
        codec = self.codecs[n - 1]
        for j, a in zip(picked, weights):
            c = u.children[j]
            x = self.work(c, v, t)
            k = self.count(("up", n, c.index))
            key = (self.seed, 4, n, c.index, t, k)
            if self.error_feedback[n - 1]:
                z = (x - v) + self.residual.get((n, c.index), np.zeros_like(v))
                msg = codec.encode(z, np.zeros_like(v), key)
                self.residual[(n, c.index)] = z - codec.decode(msg, v.size)
            else:
                msg = codec.encode(x, v, key)
            codec.decode_add(msg, a, acc)
        new = self.server_step(n, u, v, acc)
        dl = self.downlink[n - 1]
        if down and dl is not None:
            msg = dl.encode(new, v, (self.seed, 10, n, u.index, t, call))
            new = v.copy()
            dl.decode_add(msg, np.float32(1), new)
        return new

    def run(self, rounds):
        w = self.vector()
        for t in range(rounds):
            self.calls = {}
            w = self.aggregate(self.root, w, t)
        return w


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
    return Reference(
        root, cfg.tau, q.levels, q.bucket, t.lr, t.batch_size, t.seed, model, data.train,
        data.samples if topo.weighting == "samples" else None,
        kinds=list(q.kind) or None, fraction=list(cfg.participation.fraction) or None,
        availability=list(cfg.participation.availability) or None, weighting=cfg.participation.weighting,
        server=server, error_feedback=list(q.error_feedback) or None, downlink=list(q.downlink) or None,
        client=client, lr_at=schedule.at if schedule else None,
        tensor_sizes=tuple(p.numel() for p in model.parameters()),
        fractions=list(q.topk_fraction) or None)
