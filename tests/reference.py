"""A deliberately simple serial QMLHFL: plain loops over a nested-list tree.

Written from DESIGN section 1 for the tests; it shares nothing with the engine
(topology, comm, aggregate, train, session) except the codecs (called through
their public interface), the data generator and the model definition (its
inputs).  Random streams follow the
documented keys (docs/reproducibility in docs/results.md):
  minibatches  SeedSequence([seed, 3, device, round, call])
  quantizer    key (seed, 4, layer, child index, round, call), drawn by the codec
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from qmlhfl_mpi.core.codecs import make_codec


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
    def __init__(self, root: Node, tau, levels, bucket, lr, batch, seed, model, train_data, samples=None):
        self.root, self.tau, self.lr, self.batch, self.seed = root, tau, lr, batch, seed
        self.codecs = [make_codec(s, bucket) for s in levels]
        self.model = model
        self.params = list(model.parameters())
        self.data = train_data
        self.samples = samples
        self.calls = {}

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
        for s in range(self.tau[0]):
            idx = torch.from_numpy(order[s])
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                for p, gr in zip(self.params, grads):
                    p.add_(gr, alpha=-self.lr)
        return self.vector()

    def size(self, node):
        if self.samples is None:
            return len(node.devices)
        return sum(int(self.samples[d]) for d in node.devices)

    def work(self, c, v, t):
        if c.layer == 0:
            return self.local_sgd(c.devices[0], v, t)
        for _ in range(self.tau[c.layer]):
            v = self.aggregate(c, v, t)
        return v

    def aggregate(self, u, v, t):
        n = u.layer
        acc = np.zeros_like(v)
        for c in u.children:
            x = self.work(c, v, t)
            k = self.count(("up", n, c.index))
            codec = self.codecs[n - 1]
            msg = codec.encode(x, v, (self.seed, 4, n, c.index, t, k))
            codec.decode_add(msg, np.float32(self.size(c) / self.size(u)), acc)
        return v + acc

    def run(self, rounds):
        w = self.vector()
        for t in range(rounds):
            self.calls = {}
            w = self.aggregate(self.root, w, t)
        return w
