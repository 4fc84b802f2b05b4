"""HDF5 results: schema, writer and reader.  The only module that imports h5py.

Schema (documented for users in docs/results.md)::

    /                      attrs: config_yaml, version, mpi_library, world_size,
                                  torch_version, numpy_version, h5py_version,
                                  created, status, status_message, num_params, N
    /topology/starts_<n>   device boundaries of the nodes of layer n (n = 0..N)
    /topology/rank_blocks  device boundaries of the ranks' blocks
    /topology/samples      training samples per device
    /quantizer/levels, bucket, message_bytes, messages_per_round, q   (per link)
    /metrics/round, test_accuracy, test_loss, train_loss,
             uplink_bytes (rounds x N), time_compute, time_codec, time_comm,
             time_eval, time_round, modelled_time
    /model/final           flat float32 cloud model after the last round
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

SCALAR_METRICS = ("round", "test_accuracy", "test_loss", "train_loss", "time_compute",
                  "time_codec", "time_comm", "time_eval", "time_round", "modelled_time")


def output_problem(path: str | Path, overwrite: bool) -> str | None:
    """Why the results file cannot be written, or ``None`` if it can."""
    p = Path(path)
    if p.exists() and not overwrite:
        return (f"output file {str(p)!r} already exists; refusing to overwrite a result. "
                "Choose another output.path (e.g. --set output.path=results/other.h5) or pass --overwrite")
    if p.exists() and p.is_dir():
        return f"output.path {str(p)!r} is a directory; give a file name such as {str(p / 'run.h5')!r}"
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return f"cannot create output file {str(p)!r}: directory {str(probe)!r} is not writable"
    return None


class ResultsWriter:
    """Writes one run's file; used by one rank only.  Flushes after every round so
    a crash keeps the finished rounds."""

    def __init__(self, path: str | Path, *, overwrite: bool, attrs: Mapping[str, Any],
                 topology: Mapping[str, np.ndarray], quantizer: Mapping[str, np.ndarray], num_links: int) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        self.f = h5py.File(p, "w" if overwrite else "w-")
        for k, v in attrs.items():
            self.f.attrs[k] = str(v) if isinstance(v, str) else v
        self.f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        self.f.attrs["status"] = "running"
        self.f.attrs["status_message"] = ""
        g = self.f.create_group("topology")
        for k, v in topology.items():
            g.create_dataset(k, data=v)
        q = self.f.create_group("quantizer")
        for k, v in quantizer.items():
            q.create_dataset(k, data=v)
        m = self.f.create_group("metrics")
        for k in SCALAR_METRICS:
            dt = np.int64 if k == "round" else np.float64
            m.create_dataset(k, shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,))
        m.create_dataset("uplink_bytes", shape=(0, num_links), maxshape=(None, num_links),
                         dtype=np.int64, chunks=(256, num_links))
        self.f.create_group("model")
        self.f.flush()

    def append_round(self, row: Mapping[str, Any]) -> None:
        """Append one global round; ``row`` has every metric name of the schema."""
        m = self.f["metrics"]
        i = m["round"].shape[0]
        for k in SCALAR_METRICS:
            m[k].resize((i + 1,))
            m[k][i] = row[k]
        ub = m["uplink_bytes"]
        ub.resize((i + 1, ub.shape[1]))
        ub[i] = np.asarray(row["uplink_bytes"], dtype=np.int64)
        self.f.flush()

    def write_model(self, name: str, vec: np.ndarray) -> None:
        g = self.f["model"]
        if name in g:
            del g[name]
        g.create_dataset(name, data=np.asarray(vec, dtype=np.float32))
        self.f.flush()

    def close(self, status: str, message: str = "") -> None:
        if self.f:
            self.f.attrs["status"] = status
            self.f.attrs["status_message"] = message
            self.f.close()


def read_results(path: str | Path) -> dict[str, Any]:
    """Everything in a results file as numpy arrays and attributes (plain dict)."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        for grp in ("metrics", "topology", "quantizer", "model"):
            if grp in f:
                out[grp] = {k: f[grp][k][()] for k in f[grp]}
    return out
