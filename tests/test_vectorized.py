"""Batched local SGD in process: a device's result does not depend on its batch-mates, the
losses and steps match the unbatched path to round-off, and `auto` follows the model size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qmlhfl_mpi.learning.models import build_model
from qmlhfl_mpi.learning.train import LocalTrainer
from qmlhfl_mpi.learning.vectorized import AUTO_MAX_PARAMS, VectorTrainer, use_vectorized


def data(devices, n=40, dim=12, classes=3):
    out = []
    for d in devices:
        g = np.random.default_rng(d)
        x = torch.from_numpy(g.standard_normal((n + 7 * (d % 3), dim)).astype(np.float32))
        y = torch.from_numpy(g.integers(0, classes, len(x)))
        out.append((x, y))
    return out


@pytest.fixture
def trainer():
    torch.set_num_threads(1)
    return LocalTrainer(build_model("mlp", (12,), 3, args={"hidden": 7}, seed=3), 0.1, 16, seed=5)


@pytest.mark.parametrize("node", [range(0, 9), range(0, 140)])  # one batch; three, the last one short
def test_a_device_result_does_not_depend_on_which_devices_this_rank_hosts(trainer, node):
    v = trainer.get_vector()
    devices = list(node)
    full = VectorTrainer(trainer).train_many(v, data(devices), 4, devices, 2, [1] * len(devices), node)
    for hosted in ([0, 1], [2, 3, 4, 5], [6], [7, 8], [0, 3, 6], devices[60:70], devices[-5:]):
        part = VectorTrainer(trainer).train_many(v, data(hosted), 4, hosted, 2, [1] * len(hosted), node)
        for k, d in enumerate(hosted):
            assert np.array_equal(part[k][0], full[d][0]) and part[k][1] == full[d][1], (hosted, d)


def test_sampled_peers_form_one_batch_whatever_their_ids_and_hosts(trainer, monkeypatch):
    """Ten devices drawn from a node of 10,000 train in one batch of ten (the layout follows the draw, not the
    tree), each with the same bits whichever of them this rank hosts."""
    peers = np.array([17, 905, 1999, 2048, 4100, 5003, 6400, 7001, 8191, 9999])
    vt = VectorTrainer(trainer)
    sizes = []
    real = vt._train_slots
    monkeypatch.setattr(vt, "_train_slots", lambda start, slots, *a, **k: (sizes.append(len(slots)),
                                                                            real(start, slots, *a, **k))[1])
    v = trainer.get_vector()
    full = vt.train_many(v, data(peers.tolist()), 3, peers.tolist(), 1, [0] * 10, peers)
    assert sizes == [10]
    for hosted in ([17, 905], [2048, 9999], [6400]):
        part = vt.train_many(v, data(hosted), 3, hosted, 1, [0] * len(hosted), peers)
        for k, d in enumerate(hosted):
            j = peers.tolist().index(d)
            assert np.array_equal(part[k][0], full[j][0]) and part[k][1] == full[j][1], (hosted, d)
    assert sizes == [10] * 4
    for j in (0, 5, 9):  # and each agrees with its unbatched run to round-off
        x, y = data([int(peers[j])])[0]
        ref, loss = trainer.train(v, x, y, 3, int(peers[j]), 1, 0)
        assert np.max(np.abs(full[j][0] - ref)) <= 1e-6 and full[j][1] == pytest.approx(loss, rel=1e-6)
    with pytest.raises(ValueError, match="not among the aggregation's peers"):
        vt.train_many(v, data([18]), 3, [18], 1, [0], peers)


def test_batched_agrees_with_unbatched_to_round_off(trainer):
    v = trainer.get_vector()
    devices = [0, 1, 2, 3]
    batched = VectorTrainer(trainer).train_many(v, data(devices), 5, devices, 0, [0] * 4, range(4))
    for k, (x, y) in enumerate(data(devices)):
        ref, loss = trainer.train(v, x, y, 5, devices[k], 0, 0)
        assert np.max(np.abs(batched[k][0] - ref)) <= 1e-6
        assert batched[k][1] == pytest.approx(loss, rel=1e-6)


def test_devices_with_fewer_samples_than_the_batch_are_batched_apart(trainer):
    v = trainer.get_vector()
    small = [(torch.randn(5, 12), torch.randint(0, 3, (5,)))]  # 5 < batch 16: effective batch 5
    res = VectorTrainer(trainer).train_many(v, data([0]) + small + data([2]), 3, [0, 1, 2], 0, [0, 0, 0], range(3))
    ref, _ = trainer.train(v, *small[0], 3, 1, 0, 0)
    assert len(res) == 3 and np.max(np.abs(res[1][0] - ref)) <= 1e-6


def test_auto_follows_size_and_dropout():
    small = build_model("mlp", (12,), 3, args={"hidden": 7})
    big = build_model("mlp", (784,), 10, args={"hidden": 100})  # 89,610 parameters
    assert sum(p.numel() for p in big.parameters()) > AUTO_MAX_PARAMS
    assert use_vectorized("auto", small, 200) and not use_vectorized("auto", big, AUTO_MAX_PARAMS + 1)
    assert use_vectorized("on", big, 10**6) and not use_vectorized("off", small, 10)
    dropout = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    assert not use_vectorized("auto", dropout, 12)
    with pytest.raises(ValueError, match="dropout"):
        use_vectorized("on", dropout, 12)
