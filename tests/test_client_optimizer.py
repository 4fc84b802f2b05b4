"""The client optimiser: momentum / nesterov / weight decay equal torch.optim.SGD bit for bit,
the proximal term equals the independent loop of tests/reference_client.py and pulls towards the
start vector, schedules give their formulas, plain options are today's SGD bit for bit, the
batched path agrees with the unbatched one, and bad values are refused by name."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmlhfl_mpi.core import rng
from qmlhfl_mpi.core.schedule import SCHEDULES, LRSchedule
from qmlhfl_mpi.learning.models import build_model
from qmlhfl_mpi.learning.train import ClientOptimizer, LocalTrainer, loss_fn
from qmlhfl_mpi.learning.vectorized import VectorTrainer
from reference_client import sgd_run

STEPS, DEVICE, ROUND, CALL = 6, 3, 2, 1
OPTIONS = [
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"weight_decay": 0.05},
    {"momentum": 0.5, "weight_decay": 0.01},
    {"momentum": 0.8, "nesterov": True, "weight_decay": 0.02},
]
PROX = [
    {"prox_mu": 0.3},
    {"prox_mu": 0.3, "momentum": 0.9},
    {"prox_mu": 0.1, "momentum": 0.7, "nesterov": True, "weight_decay": 0.01},
]


def model(name="mlp"):
    if name == "cnn":
        return build_model("cnn", (1, 28, 28), 10, seed=3)
    return build_model("mlp", (12,), 3, args={"hidden": 7}, seed=3)


def dataset(name="mlp", n=40, seed=0):
    g = np.random.default_rng(seed)
    shape = (n, 1, 28, 28) if name == "cnn" else (n, 12)
    x = torch.from_numpy(g.standard_normal(shape).astype(np.float32))
    return x, torch.from_numpy(g.integers(0, 10 if name == "cnn" else 3, n))


def trainer(opt=None, schedule=None, name="mlp", lr=0.1):
    return LocalTrainer(model(name), lr, 16, seed=5, opt=opt, schedule=schedule)


def order(t, n, steps=STEPS, device=DEVICE, round_=ROUND, call=CALL):
    """The minibatches LocalTrainer.train draws (its documented stream)."""
    return t._batches(n, steps, rng.stream(t.seed, rng.BATCH, device, round_, call))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(t, v, x, y, steps=STEPS):
    return t.train(v, x, y, steps, DEVICE, ROUND, CALL)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kw", OPTIONS)
def test_momentum_nesterov_weight_decay_equal_torch_sgd_bit_for_bit(kw, foreach, name):
    x, y = dataset(name)
    t = trainer(ClientOptimizer(**kw), name=name)
    v = t.get_vector()
    out, loss_sum = run(t, v, x, y)
    ref = trainer(name=name)  # same flat layout; torch.optim.SGD steps its parameters
    ref.set_vector(v)
    sgd = torch.optim.SGD(ref.params, lr=0.1, foreach=foreach, **kw)
    losses = 0.0
    for bi in torch.from_numpy(order(t, len(y))):
        sgd.zero_grad()
        loss = loss_fn(ref.model(x[bi]), y[bi])
        loss.backward()
        sgd.step()
        losses += float(loss.detach())
    assert np.array_equal(out, ref.get_vector())
    assert loss_sum == losses
    assert not np.array_equal(out, run(trainer(name=name), v, x, y)[0])  # the options do something


@pytest.mark.parametrize("kw", OPTIONS + PROX + [{}])
def test_the_engine_equals_the_independent_reference_loop_bit_for_bit(kw):
    x, y = dataset()
    t = trainer(ClientOptimizer(**kw))
    v = t.get_vector()
    out, _ = run(t, v, x, y)
    m = model()
    params = list(m.parameters())
    sgd_run(m, params, x, y, order(t, len(y)), 0.1, **kw)
    assert np.array_equal(out, torch.cat([p.detach().reshape(-1) for p in params]).numpy())


def test_the_proximal_term_pulls_towards_the_start_vector():
    x, y = dataset(n=64)
    v = trainer().get_vector()
    dist = {mu: float(np.linalg.norm(run(trainer(ClientOptimizer(prox_mu=mu), lr=0.2), v, x, y, 30)[0] - v))
            for mu in (0.0, 1.0, 3.0)}
    assert dist[3.0] < dist[1.0] < dist[0.0]
    assert dist[3.0] < 0.7 * dist[0.0]


def test_plain_options_are_todays_sgd_bit_for_bit():
    x, y = dataset()
    t = trainer(ClientOptimizer(momentum=0.0, nesterov=False, weight_decay=0.0, prox_mu=0.0))
    assert t.opt.is_plain and trainer().opt.is_plain and not ClientOptimizer(prox_mu=1e-9).is_plain
    v = t.get_vector()
    out, loss_sum = run(t, v, x, y)
    # today's loop, written out: the trainer's own flat layout, one _foreach_add_ per step
    ref = trainer()
    ref.set_vector(v)
    losses = 0.0
    for bi in torch.from_numpy(order(t, len(y))):
        for p in ref.params:
            p.grad = None
        loss = loss_fn(ref.model(x[bi]), y[bi])
        loss.backward()
        with torch.no_grad():
            torch._foreach_add_(ref.params, [p.grad for p in ref.params], alpha=-0.1)
        losses += float(loss.detach())
    assert np.array_equal(out, ref.get_vector()) and loss_sum == losses
    assert np.array_equal(out, run(trainer(), v, x, y)[0])
    # a constant schedule at the same rate is the same run
    assert np.array_equal(out, run(trainer(schedule=LRSchedule(lr=0.1)), v, x, y)[0])


def test_the_schedule_sets_the_rate_of_the_round():
    x, y = dataset()
    sched = LRSchedule(kind="step", lr=0.4, step_rounds=1, gamma=0.25)  # round 2: 0.4 / 16 = 0.025
    t = trainer(schedule=sched, lr=123.0)
    v = t.get_vector()
    assert t.lr_at(ROUND) == 0.4 * 0.25**2
    assert np.array_equal(run(t, v, x, y)[0], run(trainer(lr=0.4 * 0.25**2), v, x, y)[0])
    opt = ClientOptimizer(momentum=0.9, prox_mu=0.1)
    assert np.array_equal(run(trainer(opt, sched, lr=1.0), v, x, y)[0], run(trainer(opt, lr=0.025), v, x, y)[0])


def test_schedule_values():
    assert SCHEDULES == ("constant", "step", "cosine")
    assert [LRSchedule(lr=0.3).at(t) for t in (0, 7, 1000)] == [0.3] * 3
    step = LRSchedule(kind="step", lr=1.0, step_rounds=3, gamma=0.5)
    assert [step.at(t) for t in range(8)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    cos = LRSchedule(kind="cosine", lr=0.1, lr_min=0.01, rounds=4)
    assert cos.at(0) == 0.1
    assert cos.at(2) == pytest.approx(0.055, rel=1e-15)
    assert [cos.at(t) for t in range(4)] == [0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert all(cos.at(t) > cos.at(t + 1) > 0.01 for t in range(3))
    assert LRSchedule(kind="cosine", lr=0.2, rounds=1).at(0) == 0.2
    assert LRSchedule(kind="step", lr=0.2, step_rounds=1, gamma=1.0).at(9) == 0.2
    with pytest.raises(ValueError, match=r"round = 4: the cosine schedule covers rounds \[0, 4\)"):
        cos.at(4)
    with pytest.raises(ValueError, match="round = -1"):
        step.at(-1)


@pytest.mark.parametrize("kw,match", [
    ({"kind": "linear", "lr": 0.1}, r"kind = 'linear': must be one of constant, step, cosine"),
    ({"lr": 0.0}, r"lr = 0.0: must be > 0"),
    ({"lr": float("nan")}, r"lr = nan: must be a finite number"),
    ({"kind": "step", "lr": 0.1}, r"step_rounds = 0: must be >= 1"),
    ({"kind": "step", "lr": 0.1, "step_rounds": 2.5}, r"step_rounds = 2.5: must be an integer"),
    ({"kind": "step", "lr": 0.1, "step_rounds": 2, "gamma": 1.5}, r"gamma = 1.5: must be in \(0, 1\]"),
    ({"kind": "step", "lr": 0.1, "step_rounds": 2, "gamma": 0.0}, r"gamma = 0.0: must be in \(0, 1\]"),
    ({"kind": "cosine", "lr": 0.1, "rounds": 0}, r"rounds = 0: must be >= 1"),
    ({"kind": "cosine", "lr": 0.1, "rounds": 5, "lr_min": 0.2}, r"lr_min = 0.2: must be in \[0, lr\]"),
    ({"kind": "cosine", "lr": 0.1, "rounds": 5, "lr_min": -0.1}, r"lr_min = -0.1: must be in \[0, lr\]"),
])
def test_bad_schedules_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"momentum": 1.0}, r"momentum = 1.0: must be in \[0, 1\)"),
    ({"momentum": -0.1}, r"momentum = -0.1: must be in \[0, 1\)"),
    ({"momentum": float("inf")}, r"momentum = inf: must be a finite number"),
    ({"nesterov": True}, r"nesterov = True needs momentum > 0"),
    ({"nesterov": 1, "momentum": 0.5}, r"nesterov = 1: must be true or false"),
    ({"weight_decay": -1e-4}, r"weight_decay = -0.0001: must be >= 0"),
    ({"prox_mu": -1}, r"prox_mu = -1: must be >= 0"),
    ({"prox_mu": "0.1"}, r"prox_mu = '0.1': must be a finite number"),
])
def test_bad_client_options_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        ClientOptimizer(**kw)


def vdata(devices, n=40):
    out = []
    for d in devices:
        g = np.random.default_rng(d)
        x = torch.from_numpy(g.standard_normal((n + 7 * (d % 3), 12)).astype(np.float32))
        out.append((x, torch.from_numpy(g.integers(0, 3, len(x)))))
    return out


@pytest.mark.parametrize("kw", OPTIONS + PROX)
def test_batched_agrees_with_unbatched_to_round_off(kw):
    sched = LRSchedule(kind="cosine", lr=0.2, lr_min=0.02, rounds=5)
    t = trainer(ClientOptimizer(**kw), sched)
    v = t.get_vector()
    devices = [0, 1, 2, 3, 4]
    batched = VectorTrainer(t).train_many(v, vdata(devices), 5, devices, ROUND, [0] * 5, range(5))
    plain = VectorTrainer(trainer(schedule=sched)).train_many(v, vdata(devices), 5, devices, ROUND, [0] * 5, range(5))
    for k, (x, y) in enumerate(vdata(devices)):
        ref, loss = t.train(v, x, y, 5, devices[k], ROUND, 0)
        assert np.max(np.abs(batched[k][0] - ref)) <= 1e-6  # the tolerance of tests/test_vectorized.py
        assert batched[k][1] == pytest.approx(loss, rel=1e-6)
        assert np.max(np.abs(batched[k][0] - plain[k][0])) > 1e-4  # the options do something


def test_batched_plain_path_is_unchanged():
    """Plain options batched: ``params - lr * grads`` per step, today's expression, written out."""
    t = trainer(schedule=LRSchedule(kind="step", lr=0.2, step_rounds=1, gamma=0.5))  # round 2: 0.05
    v = t.get_vector()
    devices = [0, 1, 2]
    vt = VectorTrainer(t)
    got = vt.train_many(v, vdata(devices), 4, devices, ROUND, [0] * 3, range(3))
    start = torch.from_numpy(v)
    sizes = [p.numel() for p in t.params]
    params, off = {}, 0
    for name, p in zip(vt.names, t.params):
        params[name] = start[off : off + p.numel()].view(p.shape).unsqueeze(0).expand(3, *p.shape).clone()
        off += p.numel()
    batches = [order(t, len(y), 4, d, ROUND, 0) for d, (_, y) in zip(devices, vdata(devices))]
    xs = torch.stack([x[torch.from_numpy(b)] for (x, _), b in zip(vdata(devices), batches)])
    ys = torch.stack([y[torch.from_numpy(b)] for (_, y), b in zip(vdata(devices), batches)])
    for s in range(4):
        grads, _ = vt._step(params, xs[:, s], ys[:, s])
        params = {n: params[n] - 0.05 * grads[n] for n in vt.names}
    flat = torch.cat([params[n].reshape(3, -1) for n in vt.names], dim=1).numpy()
    assert sum(sizes) == flat.shape[1]
    for k in range(3):
        assert np.array_equal(got[k][0], flat[k])


def test_optimiser_state_lives_for_one_local_run():
    x, y = dataset()
    opt = ClientOptimizer(momentum=0.9, nesterov=True, prox_mu=0.5)
    t = trainer(opt)
    v = t.get_vector()
    first, _ = run(t, v, x, y)
    other = run(t, first, *dataset(seed=1))[0]  # leaves buffers and w0 behind
    assert np.array_equal(run(t, v, x, y)[0], first)
    assert np.array_equal(run(trainer(opt), first, *dataset(seed=1))[0], other)
