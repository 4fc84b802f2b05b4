"""The HDF5 results file of a run: schema and writer.  Used by one rank only.

Schema (documented for users in docs/results.md)::

    /                      attrs: config_yaml, version, mpi_library, world_size,
                                  torch_version, numpy_version, threads_per_rank,
                                  created, status, status_message, num_params, N,
                                  resumed_at_rounds (after a --resume)
    /topology/starts_<n>   device boundaries of the nodes of layer n (n = 0..N)
    /topology/rank_blocks  device boundaries of the ranks' blocks
    /topology/samples      training samples per device
    /topology/class_counts training samples per device and class (devices x classes; -1 for a device
                           of a generated data set whose data was never made)
    /topology/parents      int64 rows (round, device, edge): from that round on the device sits under that
                           edge server (-1: it sits the round out); a row for every device whose edge differs
                           from the round before (round 0: from starts_1); empty when nothing moves or fails
    (per-device arrays of 4096 entries or more are stored chunked and gzip-compressed)
    /quantizer/levels, bucket, kind, message_bytes, messages_per_round, q   (per link)
    /metrics/round, test_accuracy, test_loss, train_loss,
             uplink_bytes, messages, downlink_bytes, dropped (each rounds x N),
             time_compute, time_codec, time_comm, time_eval, time_round, modelled_time,
             virtual_time, offline, link_busy (rounds x N), critical_path (rounds x N+1),
             finish_time (rounds x 5: percentiles 0, 10, 50, 90, 100), epsilon (privacy; NaN without),
             clip (privacy's clip in the round), unclipped_fraction (adaptive clipping's noised fraction)
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

from ..core.text import clean_text
from .space import as_os_error

SCALAR_METRICS = ("round", "test_accuracy", "test_loss", "train_loss", "time_compute",
                  "time_codec", "time_comm", "time_eval", "time_round", "modelled_time", "virtual_time", "offline",
                  "epsilon", "clip", "unclipped_fraction")
INT_SCALARS = ("round", "offline")
LINK_METRICS = ("uplink_bytes", "messages", "downlink_bytes", "dropped", "secagg_bytes")  # int64, per link
# the clock's arrays: name -> (dtype, columns as a function of N)
ARRAY_METRICS: dict[str, tuple[type, Any]] = {
    "link_busy": (np.float64, lambda N: N), "critical_path": (np.int64, lambda N: N + 1),
    "finish_time": (np.float64, lambda N: 5)}


def _columns(num_links: int) -> dict[str, tuple[type, int]]:
    """Every metric but the scalars: its dtype and number of columns."""
    out: dict[str, tuple[type, int]] = {k: (np.int64, num_links) for k in LINK_METRICS}
    out.update({k: (dt, cols(num_links)) for k, (dt, cols) in ARRAY_METRICS.items()})
    return out


@contextmanager
def _io(path: Path, what: str) -> Iterator[None]:
    """h5py's I/O failures (``RuntimeError`` as often as ``OSError``) as one ``OSError``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise as_os_error(e, f"{what} {str(path)!r}") from None


def _clean_array(v: Any) -> Any:
    """Arrays of strings (``dtype=object`` or numpy unicode) as object arrays, every element through
    :func:`clean_text`; other values unchanged."""
    arr = np.asarray(v)
    if arr.dtype.kind in "OU":
        return np.array([clean_text(x.decode("utf-8", "replace") if isinstance(x, bytes) else x)
                         for x in arr.reshape(-1)], dtype=object).reshape(arr.shape)
    return v


COMPRESS_FROM = 4096  # entries: per-device arrays this large are stored chunked and compressed


def _create(group: h5py.Group, name: str, value: Any) -> None:
    """A dataset holding ``value``; a large numeric array chunked and gzip-compressed (with shuffle), which
    turns a million devices' sample counts into a few MB and their mostly unknown class counts into KB."""
    arr = np.asarray(value)
    if arr.dtype.kind in "iuf" and arr.size >= COMPRESS_FROM:
        group.create_dataset(name, data=arr, chunks=True, compression="gzip", compression_opts=4, shuffle=True)
    else:
        group.create_dataset(name, data=value)


def _set_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    """Attributes with every string cleaned (:func:`~qmlhfl_mpi.core.text.clean_text`: no NUL or control
    characters reach HDF5)."""
    for k, v in attrs.items():
        f.attrs[k] = clean_text(v) if isinstance(v, str) else _clean_array(v) if isinstance(v, (list, tuple)) else v


class ResultsWriter:
    """Writes one run's file; used by one rank only.  Flushes after every round so
    a crash keeps the finished rounds."""

    def __init__(self, path: str | Path, *, overwrite: bool, attrs: Mapping[str, Any],
                 topology: Mapping[str, np.ndarray], quantizer: Mapping[str, np.ndarray], num_links: int) -> None:
        with _io(Path(path), "creating"):
            try:
                self._create(Path(path), overwrite, attrs, topology, quantizer, num_links)
            except BaseException:
                if getattr(self, "f", None):
                    self.f.close()
                raise

    def _create(self, path: Path, overwrite: bool, attrs: Mapping[str, Any], topology: Mapping[str, np.ndarray],
                quantizer: Mapping[str, np.ndarray], num_links: int) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        self.f = h5py.File(p, "w" if overwrite else "w-")
        _set_attrs(self.f, attrs)
        self.f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        self.f.attrs["status"] = "running"
        self.f.attrs["status_message"] = ""
        g = self.f.create_group("topology")
        for k, v in topology.items():
            _create(g, k, _clean_array(v))
        self._parents(g)
        q = self.f.create_group("quantizer")
        for k, v in quantizer.items():
            q.create_dataset(k, data=_clean_array(v))
        m = self.f.create_group("metrics")
        for k in SCALAR_METRICS:
            m.create_dataset(k, shape=(0,), maxshape=(None,), dtype=np.int64 if k in INT_SCALARS else np.float64,
                             chunks=(256,))
        for k, (dt, cols) in _columns(num_links).items():
            m.create_dataset(k, shape=(0, cols), maxshape=(None, cols), dtype=dt, chunks=(256, cols))
        self.f.create_group("model")
        self.f.flush()

    @classmethod
    def reopen(cls, path: str | Path, rounds_done: int, attrs: Mapping[str, Any]) -> ResultsWriter:
        """Continue an existing file: drop metric rows after ``rounds_done``, mark it running."""
        self = cls.__new__(cls)
        self.path = Path(path)
        with _io(self.path, "reopening"):
            try:
                self._reopen(rounds_done, attrs)
            except BaseException:
                if getattr(self, "f", None):
                    self.f.close()
                raise
        return self

    def _reopen(self, rounds_done: int, attrs: Mapping[str, Any]) -> None:
        self.f = h5py.File(self.path, "r+")
        m = self.f["metrics"]
        for k in m:
            if m[k].shape[0] > rounds_done:
                m[k].resize((rounds_done,) + m[k].shape[1:])
        links = m["uplink_bytes"].shape[1]
        # a file from an older version lacks some metrics: -1 (integers) or NaN marks the unknown rows
        for k, (dt, cols) in {**{k: (np.int64 if k in INT_SCALARS else np.float64, 0) for k in SCALAR_METRICS},
                              **_columns(links)}.items():
            if k not in m:
                shape = (rounds_done, cols) if cols else (rounds_done,)
                m.create_dataset(k, data=np.full(shape, -1 if dt is np.int64 else np.nan, dtype=dt),
                                 maxshape=(None,) + shape[1:], chunks=(256,) + shape[1:])
        self._mark_resumed(rounds_done)
        _set_attrs(self.f, attrs)
        self.f.attrs["status"] = "running"
        self.f.attrs["status_message"] = ""
        self.f.flush()

    def mark_resumed(self, rounds_done: int) -> None:
        """Record that the run continues after ``rounds_done`` rounds (attribute ``resumed_at_rounds``)."""
        with _io(self.path, "updating"):
            self._mark_resumed(rounds_done)
            self.f.flush()

    def _mark_resumed(self, rounds_done: int) -> None:
        resumed = list(self.f.attrs.get("resumed_at_rounds", [])) + [rounds_done]
        self.f.attrs["resumed_at_rounds"] = np.array(resumed, dtype=np.int64)

    def append_round(self, row: Mapping[str, Any]) -> None:
        """Append one global round; ``row`` has every metric name of the schema."""
        with _io(self.path, "appending a round to"):
            self._append({k: np.asarray(row[k])[None] for k in self.f["metrics"]})

    def append_rows(self, rows: Mapping[str, np.ndarray]) -> None:
        """Append several rounds at once: ``rows[name]`` holds the rounds' values of each metric of the file."""
        with _io(self.path, "appending rounds to"):
            self._append(rows)

    def _append(self, rows: Mapping[str, Any]) -> None:
        m = self.f["metrics"]
        missing = sorted(set(m) - set(rows))
        if missing:
            raise ValueError(f"rows for {str(self.path)!r} lack the metrics {missing}")
        i = m["round"].shape[0]
        k_new = len(rows["round"])
        for k in m:
            ds = m[k]
            ds.resize((i + k_new,) + ds.shape[1:])
            ds[i:] = np.asarray(rows[k], dtype=ds.dtype).reshape((k_new,) + ds.shape[1:])
        self.f.flush()

    def metrics(self) -> dict[str, np.ndarray]:
        """Every ``/metrics`` dataset as it is now (the rows of the rounds so far)."""
        with _io(self.path, "reading the metrics of"):
            return {k: self.f["metrics"][k][()] for k in self.f["metrics"]}

    @property
    def rounds(self) -> int:
        """Rounds the file holds."""
        return int(self.f["metrics"]["round"].shape[0])

    def update_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Set rows ``rows`` (ascending ids) of ``/topology/<name>`` to ``values``."""
        with _io(self.path, f"writing /topology/{name} to"):
            ds = self.f["topology"][name]
            for lo in range(0, len(rows), 65536):  # h5py selects rows by a list: a bounded list at a time
                ds[rows[lo : lo + 65536].tolist()] = values[lo : lo + 65536]
            self.f.flush()

    @staticmethod
    def _parents(g: h5py.Group) -> h5py.Dataset:
        if "parents" not in g:
            g.create_dataset("parents", shape=(0, 3), maxshape=(None, 3), dtype=np.int64, chunks=(4096, 3),
                             compression="gzip", compression_opts=4, shuffle=True)
        return g["parents"]

    def set_parents(self, rows: np.ndarray, append: bool = False) -> None:
        """``/topology/parents``: replaced by ``rows`` (the changes of the rounds so far), or ``rows`` appended
        (one more round's)."""
        with _io(self.path, "writing /topology/parents to"):
            ds = self._parents(self.f["topology"])
            i = ds.shape[0] if append else 0
            ds.resize((i + len(rows), 3))
            if len(rows):
                ds[i:] = np.asarray(rows, dtype=np.int64)
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
                self.f.attrs["status"] = clean_text(status)
                self.f.attrs["status_message"] = clean_text(message)
        finally:
            with _io(self.path, "closing"):
                self.f.close()


def read_status(path: str | Path) -> tuple[str, int, str]:
    """(status, metric rows, config_yaml) of a results file; raises OSError if unreadable."""
    with h5py.File(path, "r") as f:
        cfg = f.attrs.get("config_yaml", "")
        return (str(f.attrs.get("status", "")), int(f["metrics/round"].shape[0]),
                cfg.decode() if isinstance(cfg, bytes) else str(cfg))
