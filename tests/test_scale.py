"""Cross-device scale in process: a device's data exists once it is drawn (counted, not timed), the cache keeps
the most recently drawn devices within its budget, per-round statistics follow the drawn devices, and a
100,000-device run writes a small results file whose class counts are known exactly for the devices made."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from qmlhfl_mpi import Callback, Session, load_config
from qmlhfl_mpi.core.participation import Participation, expected_messages, inclusion
from qmlhfl_mpi.core.stats import RoundStats
from qmlhfl_mpi.core.topology import Tree, aggregations_per_round
from qmlhfl_mpi.data.local import DeviceStore, evaluation_devices
from qmlhfl_mpi.data.synthetic import Synthetic


def store_of(devices, cache_bytes, made_log):
    def make(k):
        made_log.append(k)
        return torch.full((4, 3), float(k)), torch.tensor([k % 2, 0, 1, 1])  # 48 + 32 bytes

    return DeviceStore(devices, make, cache_bytes, num_classes=2)


def test_the_store_makes_a_device_once_while_it_is_cached_and_evicts_the_least_recently_used():
    made: list[int] = []
    store = store_of(range(10, 20), 3 * 80, made)
    for k in (10, 11, 12, 10, 13):  # 13 evicts 11 (10 was used again)
        store[k]
    assert made == [10, 11, 12, 13] and store.made == 4 and store.cached == 3
    store[10]
    store[11]
    assert made == [10, 11, 12, 13, 11] and store.made_devices == {10, 11, 12, 13}
    assert float(store[12][0][0, 0]) == 12.0
    with pytest.raises(KeyError, match="not hosted"):
        store[20]
    ids, counts = store.take_counts()
    assert ids.tolist() == [10, 11, 12, 13] and counts.tolist() == [[2, 2], [1, 3], [2, 2], [1, 3]]
    assert store.take_counts()[0].size == 0  # reported once
    tiny = store_of(range(3), 0, [])
    tiny[0]
    tiny[1]
    assert tiny.cached == 1  # the device in use always stays


def test_a_synthetic_device_trains_on_the_first_rows_of_its_samples():
    """train_data draws only the training rows, bit-identical to the rows of the full draw."""
    for ds in (Synthetic(3), Synthetic(5, dim=784, samples=60, size_sigma=1.0)):
        for k in range(0, 400, 7):
            x, y = ds.device(k)
            n = ds.train_size(k)
            a, b = ds.train_data(k)
            assert np.array_equal(a, x[:n]) and np.array_equal(b, y[:n]), k


def test_evaluation_devices_are_spread_evenly_or_all():
    assert evaluation_devices(10, 0).tolist() == list(range(10))
    assert evaluation_devices(10, 25).tolist() == list(range(10))
    assert evaluation_devices(10**6, 4).tolist() == [0, 250000, 500000, 750000]


def test_round_stats_follow_the_drawn_devices():
    st = RoundStats(np.array([3, 7, 900_000]), 2)
    st.add(7, 1.5, 5)
    st.add(900_000, 0.5, 5)
    st.add(7, 1.0, 5)
    assert st.loss.tolist() == [0.0, 2.5, 0.5] and st.steps.tolist() == [0, 10, 5]
    with pytest.raises(ValueError, match="does not train"):
        st.add(4, 1.0, 1)
    totals = st.reduce(lambda x: x, lambda x: x, 0.1)
    assert totals.train_loss == pytest.approx(3.0 / 15)


def test_expected_messages_of_a_million_devices_is_computed_by_layer():
    """The vectorised expectation equals the node-by-node sum on a small unbalanced tree, and takes a million
    devices in stride."""
    tree = Tree.from_nested([[3, 1, 7], [2, 9]])
    part = Participation((0.5, 0.7, 1.0), (0.9, 1.0, 0.8))
    tau = (2, 3, 2)
    for n in (1, 2, 3):
        slow = 0.0
        for c in range(tree.num_nodes(n - 1)):
            prob, m, node = 1.0, n, c
            while m <= tree.N:
                parent = tree.parent(m - 1, node) if m - 1 < tree.N else 0
                prob *= inclusion(part, m, len(tree.children(m, parent)))
                node, m = parent, m + 1
            slow += prob
        assert expected_messages(tree, tau, n, part) == pytest.approx(slow * aggregations_per_round(tau, n), rel=1e-12)
    big = Tree.uniform([10, 10, 10_000])
    got = expected_messages(big, (1, 1, 1), 1, Participation((0.001, 1.0, 1.0), (1.0, 1.0, 1.0)))
    assert got == pytest.approx(1000.0)


def test_a_hundred_thousand_devices_make_only_the_drawn_ones(tmp_path):
    """10^5 devices, 2 of every edge's 1,000 drawn: the store makes exactly the devices the plans draw (the test
    set is 50 devices' held-out parts), the results file stays small, and its class counts are exact for the
    devices made and -1 elsewhere."""
    out = tmp_path / "big.h5"
    cfg = load_config({
        "topology": {"branching": [10, 10, 1000]}, "tau": [1, 1, 1], "quantizer": {"levels": [4, 8, 16]},
        "participation": {"fraction": [0.002, 1.0, 1.0]},
        "data": {"name": "synthetic", "test_devices": 50, "synthetic": {"dim": 6, "classes": 3, "samples": 20}},
        "model": {"name": "logreg"}, "train": {"rounds": 2, "batch_size": 4, "seed": 1, "eval_every": 2},
        "output": {"path": str(out)}})
    session = Session(cfg, MPI.COMM_SELF)
    rt = session.runtime
    store = rt.data.train
    assert store.made == 0 and not store.made_devices and rt.data.test_devices == 50
    assert session.run().status == "completed"
    drawn: set[int] = set()
    for t in range(2):
        drawn |= set(rt.scheduler.round(t, 0.0).plan.devices().tolist())
    assert len(drawn) == 2 * 2 * 100  # 2 drawn per edge aggregation, 100 edges, 2 rounds (distinct here)
    assert store.made_devices == drawn and store.made == len(drawn)
    assert out.stat().st_size < 3e6  # per-device topology compressed (uncompressed: 4.8 MB of counts alone)
    ds = Synthetic(cfg.train.seed, dim=6, classes=3, samples=20)
    with h5py.File(out, "r") as f:
        counts = f["topology/class_counts"][()]
        samples = f["topology/samples"][()]
    known = np.flatnonzero((counts >= 0).all(axis=1))
    assert set(known.tolist()) == drawn and (counts[counts.min(axis=1) < 0] == -1).all()
    for k in sorted(drawn)[:5]:
        x, y = ds.device(k)
        assert counts[k].tolist() == np.bincount(y[: ds.train_size(k)], minlength=3).tolist()
    assert samples[12345] == ds.train_size(12345) and samples.shape == (10**5,)


class StopAfter(Callback):
    def __init__(self, k):
        self.k = k

    def on_round_end(self, session, record):
        return int(record["round"]) == self.k


def test_a_sampled_run_with_lazy_data_resumes_exactly_and_keeps_its_class_counts(tmp_path):
    """Stopped after round 1 (checkpoint) and resumed: the same model, metrics and class-count table as the run
    that went through, with a cache too small to hold one device (every draw makes its device again)."""
    def config(out):
        return load_config({
            "topology": {"branching": [4, 500]}, "tau": [2, 2], "quantizer": {"levels": [4, 16]},
            "participation": {"fraction": [0.01, 1.0]},
            "data": {"name": "synthetic", "test_devices": 20, "cache_mb": 0.001,
                     "synthetic": {"dim": 6, "classes": 3, "samples": 20}},
            "model": {"name": "logreg"}, "train": {"rounds": 3, "batch_size": 4, "seed": 2, "eval_every": 1,
                                                   "vectorize": "on"},
            "output": {"path": str(out), "checkpoint_every": 1}})

    def read(out):
        with h5py.File(out, "r") as f:
            return (f["model/final"][()], f["topology/class_counts"][()],
                    {k: f["metrics"][k][()] for k in ("train_loss", "test_loss", "uplink_bytes", "virtual_time")})

    whole, parts = tmp_path / "whole.h5", tmp_path / "parts.h5"
    assert Session(config(whole), MPI.COMM_SELF).run().status == "completed"
    assert Session(config(parts), MPI.COMM_SELF).run(callbacks=[StopAfter(0)]).status == "preempted"
    resumed = Session(config(parts), MPI.COMM_SELF)
    assert resumed.run(resume=True).status == "completed"
    a, b = read(whole), read(parts)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for key in a[2]:
        assert np.array_equal(a[2][key], b[2][key]), key
    assert 0 < (a[1] >= 0).all(axis=1).sum() < 2000  # drawn devices only
    assert resumed.runtime.data.train.cached == 1
