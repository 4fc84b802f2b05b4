"""``train.aggregate_on: device`` in process: rank 0 says where the aggregation runs and which links go through
the host, and the device backend gives the host's model and metrics.  On 1 to 4 ranks, against the serial
reference and across a resume: tests/mpi/test_engine_matrix.py."""
from __future__ import annotations

import logging

import h5py
import numpy as np
from mpi4py import MPI

from helpers import small_config
from qmlhfl_mpi import Session, config

METRICS = ("uplink_bytes", "messages", "downlink_bytes", "train_loss", "test_loss", "test_accuracy")


def test_device_aggregation_says_which_links_go_through_the_host_and_equals_the_host(tmp_path, caplog):
    cfg_path = small_config(tmp_path, topology={"tree": [[3, 2], [1, 2]]}, tau=[2, 2, 1],
                            quantizer={"levels": [4, 8, 16], "bucket": 8, "kind": ["topk", "qsgd", "qsgd"],
                                       "topk_fraction": [0.25, 0.01, 0.01], "downlink": [0, 8, 16]},
                            train={"rounds": 2, "vectorize": "on"})
    got = {}
    for backend in ("host", "device"):
        cfg = config.load(cfg_path, [f"train.aggregate_on={backend}", f"output.path={tmp_path / backend}.h5"])
        with caplog.at_level(logging.INFO, logger="qmlhfl_mpi.run.session"):
            Session(cfg, MPI.COMM_SELF).run()
        with h5py.File(cfg.output.path) as f:
            assert f.attrs["aggregation"] == {"host": "host", "device": "torch:cpu"}[backend]
            got[backend] = f["model/final"][()], {k: f["metrics"][k][()] for k in METRICS}
    # top-k has no device form: its messages go through the host
    assert "aggregation on torch:cpu; through the host" in caplog.text and "uplink 1 (topk" in caplog.text
    assert np.array_equal(got["host"][0], got["device"][0])
    for k in METRICS:
        assert np.array_equal(got["host"][1][k], got["device"][1][k], equal_nan=True), k
