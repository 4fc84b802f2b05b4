"""Byte and message accounting with every option on, in process: every message has its codec's exact length,
the downlinks theirs, and sampled links send the expected number of messages.  The options against the
independent serial reference, on 1 to 4 ranks and both backends, with exact resume:
tests/mpi/test_engine_matrix.py."""
from __future__ import annotations

import math

import h5py
import numpy as np
from mpi4py import MPI

from helpers import EVERYTHING, small_config
from qmlhfl_mpi import Session, config


def test_bytes_equal_messages_times_exact_lengths(tmp_path):
    cfg_path = small_config(tmp_path, **{**EVERYTHING, "train": {"rounds": 30, "eval_every": 30, "vectorize": "off"},
                                         "output": {"path": "out.h5"}})
    cfg = config.load(cfg_path)
    Session(cfg, MPI.COMM_SELF).run()
    tree = cfg.build_tree()
    with h5py.File(cfg.output.path) as f:
        ub, msgs, down = f["metrics/uplink_bytes"][()], f["metrics/messages"][()], f["metrics/downlink_bytes"][()]
        L, Ld = f["quantizer/message_bytes"][()], f["quantizer/downlink_bytes"][()]
        expected = f["quantizer/expected_messages_per_round"][()]
        d = int(f.attrs["num_params"])
    assert np.array_equal(ub, msgs * L[None, :])  # every message has its exact length
    k = math.ceil(0.25 * d)  # topk: k float32 values and k indices of ceil(log2 d) bits
    assert L[0] == 4 * k + math.ceil(k * max(1, math.ceil(math.log2(d))) / 8)
    assert Ld[0] == 4 * d and Ld[1] == 4 * math.ceil(d / 8) + math.ceil(d * 5 / 8)  # float32; s=8: 4+1 bits
    # link 3 (cloud, everyone takes part at layer 3): 2 children, one broadcast every round
    assert (down[:, 2] == 2 * Ld[2]).all()
    assert (msgs[:, 2] == 2).all()
    # link 1: f = 0.6 of 5/3 devices under the layer-1 nodes; link 2 availability 0.75 -> fewer than the full count
    full = [tree.num_nodes(0) * 2, tree.num_nodes(1) * 1]
    assert (msgs[:, 0] < full[0]).all() and msgs[:, 1].min() < full[1]
    for n in range(2):  # the mean over 30 rounds is near the expected count (a 4-sigma binomial-type band)
        mean = msgs[:, n].mean()
        assert abs(mean - expected[n]) < 4 * math.sqrt(expected[n] / len(msgs)) + 0.5, (n, mean, expected[n])
