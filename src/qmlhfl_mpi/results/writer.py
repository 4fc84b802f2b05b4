"""The HDF5 results file of a run: schema and writer.  Used by one rank only.

Schema (documented for users in docs/results.md)::

    /                      attrs: config_yaml, version, mpi_library, world_size,
                                  torch_version, numpy_version, threads_per_rank,
                                  created, status, status_message, num_params, N,
                                  resumed_at_rounds (after a --resume)
    /topology/starts_<n>   device boundaries of the nodes of layer n (n = 0..N)
    /topology/rank_blocks  device boundaries of the ranks' blocks
    /topology/samples      training samples per device
    /topology/class_counts training samples per device and class (devices x classes)
    /quantizer/levels, bucket, kind, message_bytes, messages_per_round, q   (per link)
    /metrics/round, test_accuracy, test_loss, train_loss,
             uplink_bytes, messages, downlink_bytes (each rounds x N),
             time_compute, time_codec, time_comm, time_eval, time_round, modelled_time
    /model/initial         flat float32 cloud model before the first round (model.init: module only)
    /model/final           flat float32 cloud model after the last round
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .space import as_os_error

SCALAR_METRICS = ("round", "test_accuracy", "test_loss", "train_loss", "time_compute",
                  "time_codec", "time_comm", "time_eval", "time_round", "modelled_time")
LINK_METRICS = ("uplink_bytes", "messages", "downlink_bytes")  # int64, one column per link


@contextmanager
def _io(path: Path, what: str) -> Iterator[None]:
    """h5py's I/O failures (``RuntimeError`` as often as ``OSError``) as one ``OSError``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise as_os_error(e, f"{what} {str(path)!r}") from None


class ResultsWriter:
    """Writes one run's file; used by one rank only.  Flushes after every round so
    a crash keeps the finished rounds."""

    def __init__(self, path: str | Path, *, overwrite: bool, attrs: Mapping[str, Any],
                 topology: Mapping[str, np.ndarray], quantizer: Mapping[str, np.ndarray], num_links: int) -> None:
        with _io(Path(path), "creating"):
            self._create(Path(path), overwrite, attrs, topology, quantizer, num_links)

    def _create(self, path: Path, overwrite: bool, attrs: Mapping[str, Any], topology: Mapping[str, np.ndarray],
                quantizer: Mapping[str, np.ndarray], num_links: int) -> None:
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
        for k in LINK_METRICS:
            m.create_dataset(k, shape=(0, num_links), maxshape=(None, num_links), dtype=np.int64,
                             chunks=(256, num_links))
        self.f.create_group("model")
        self.f.flush()

    @classmethod
    def reopen(cls, path: str | Path, rounds_done: int, attrs: Mapping[str, Any]) -> ResultsWriter:
        """Continue an existing file: drop metric rows after ``rounds_done``, mark it running."""
        self = cls.__new__(cls)
        self.path = Path(path)
        with _io(self.path, "reopening"):
            self._reopen(rounds_done, attrs)
        return self

    def _reopen(self, rounds_done: int, attrs: Mapping[str, Any]) -> None:
        self.f = h5py.File(self.path, "r+")
        m = self.f["metrics"]
        for k in m:
            if m[k].shape[0] > rounds_done:
                m[k].resize((rounds_done,) + m[k].shape[1:])
        links = m["uplink_bytes"].shape[1]
        for k in LINK_METRICS:  # a file from before version 0.3.0 lacks some: -1 marks the unknown rows
            if k not in m:
                m.create_dataset(k, data=np.full((rounds_done, links), -1, dtype=np.int64),
                                 maxshape=(None, links), chunks=(256, links))
        resumed = list(self.f.attrs.get("resumed_at_rounds", [])) + [rounds_done]
        self.f.attrs["resumed_at_rounds"] = np.array(resumed, dtype=np.int64)
        for k, v in attrs.items():
            self.f.attrs[k] = str(v) if isinstance(v, str) else v
        self.f.attrs["status"] = "running"
        self.f.attrs["status_message"] = ""
        self.f.flush()

    def append_round(self, row: Mapping[str, Any]) -> None:
        """Append one global round; ``row`` has every metric name of the schema."""
        with _io(self.path, "appending a round to"):
            self._append(row)

    def _append(self, row: Mapping[str, Any]) -> None:
        m = self.f["metrics"]
        i = m["round"].shape[0]
        for k in SCALAR_METRICS:
            m[k].resize((i + 1,))
            m[k][i] = row[k]
        for k in LINK_METRICS:
            ds = m[k]
            ds.resize((i + 1, ds.shape[1]))
            ds[i] = np.asarray(row[k], dtype=np.int64)
        self.f.flush()

    def write_model(self, name: str, vec: np.ndarray) -> None:
        with _io(self.path, f"writing /model/{name} to"):
            self._write_model(name, vec)

    def _write_model(self, name: str, vec: np.ndarray) -> None:
        g = self.f["model"]
        if name in g:
            del g[name]
        g.create_dataset(name, data=np.asarray(vec, dtype=np.float32))
        self.f.flush()

    def close(self, status: str, message: str = "") -> None:
        """Record the status and close; raises ``OSError`` if that fails (the file is closed anyway)."""
        if not self.f:
            return
        try:
            with _io(self.path, "closing"):
                self.f.attrs["status"] = status
                self.f.attrs["status_message"] = message
        finally:
            with _io(self.path, "closing"):
                self.f.close()


def read_status(path: str | Path) -> tuple[str, int, str]:
    """(status, metric rows, config_yaml) of a results file; raises OSError if unreadable."""
    with h5py.File(path, "r") as f:
        cfg = f.attrs.get("config_yaml", "")
        return (str(f.attrs.get("status", "")), int(f["metrics/round"].shape[0]),
                cfg.decode() if isinstance(cfg, bytes) else str(cfg))
