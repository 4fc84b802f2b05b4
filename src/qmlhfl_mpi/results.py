"""HDF5 results: schema, writer and reader.  The only module that imports h5py.

Schema (documented for users in docs/results.md)::

    /                      attrs: config_yaml, version, mpi_library, world_size,
                                  torch_version, numpy_version, threads_per_rank,
                                  created, status, status_message, num_params, N,
                                  resumed_at_rounds (after a --resume)
    /topology/starts_<n>   device boundaries of the nodes of layer n (n = 0..N)
    /topology/rank_blocks  device boundaries of the ranks' blocks
    /topology/samples      training samples per device
    /topology/class_counts training samples per device and class (devices x classes)
    /quantizer/levels, bucket, message_bytes, messages_per_round, q   (per link)
    /metrics/round, test_accuracy, test_loss, train_loss,
             uplink_bytes (rounds x N), time_compute, time_codec, time_comm,
             time_eval, time_round, modelled_time
    /model/final           flat float32 cloud model after the last round

The checkpoint of a run lives beside its results, in ``<output>.ckpt`` (HDF5):
attributes ``rounds_done`` and ``config_yaml`` and the dataset ``model`` (the
cloud model after ``rounds_done`` rounds).  It is written to a temporary file,
synced and renamed over the previous one, so a crash during the write leaves
the previous checkpoint intact.  Every random stream is keyed by (seed,
entity, round), so the model and the round are all a restart needs.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

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
    probe = parent / f".qmlhfl-probe-{os.getpid()}"
    try:  # a real write: permission bits say nothing for root or read-only mounts
        parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return (f"cannot write the output file {str(p)!r}: {e.strerror or e} ({e.filename or parent}); "
                "choose a writable output.path, e.g. --set output.path=results/run.h5")
    return None


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or inconsistent."""


def checkpoint_path(output: str | Path) -> Path:
    return Path(f"{output}.ckpt")


def write_checkpoint(path: str | Path, *, model: np.ndarray, rounds_done: int, config_yaml: str,
                     crash_hook: Callable[[], None] | None = None) -> None:
    """Atomically replace the checkpoint at ``path`` (temp file, fsync, rename)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["rounds_done"] = int(rounds_done)
        f.attrs["config_yaml"] = config_yaml
        f.attrs["format"] = "qmlhfl_mpi checkpoint 1"
        ds = f.create_dataset("model", shape=model.shape, dtype=np.float32)
        half = model.size // 2
        ds[:half] = model[:half]
        if crash_hook is not None:
            crash_hook()  # tests: die half-way through the write
        ds[half:] = model[half:]
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(p.parent if str(p.parent) else ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Checkpoint:
    model: np.ndarray
    rounds_done: int
    config_yaml: str


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint; :class:`CheckpointError` says what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    try:
        with h5py.File(p, "r") as f:
            if f.attrs.get("format") != "qmlhfl_mpi checkpoint 1" or "model" not in f:
                raise CheckpointError(f"{str(p)!r} is not a qmlhfl_mpi checkpoint (format attribute or model missing)")
            model = f["model"][()]
            rounds = int(f.attrs["rounds_done"])
            cfg = f.attrs["config_yaml"]
    except CheckpointError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/ValueError on damaged files
        raise CheckpointError(f"checkpoint {str(p)!r} is unreadable (truncated or corrupt?): {e}") from None
    if model.dtype != np.float32 or model.ndim != 1 or rounds < 1:
        raise CheckpointError(f"checkpoint {str(p)!r} is inconsistent: model {model.dtype}{model.shape}, rounds_done={rounds}")
    return Checkpoint(model, rounds, cfg.decode() if isinstance(cfg, bytes) else str(cfg))


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

    @classmethod
    def reopen(cls, path: str | Path, rounds_done: int, attrs: Mapping[str, Any]) -> "ResultsWriter":
        """Continue an existing file: drop metric rows after ``rounds_done``, mark it running."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.f = h5py.File(self.path, "r+")
        m = self.f["metrics"]
        for k in m:
            if m[k].shape[0] > rounds_done:
                m[k].resize((rounds_done,) + m[k].shape[1:])
        resumed = list(self.f.attrs.get("resumed_at_rounds", [])) + [rounds_done]
        self.f.attrs["resumed_at_rounds"] = np.array(resumed, dtype=np.int64)
        for k, v in attrs.items():
            self.f.attrs[k] = str(v) if isinstance(v, str) else v
        self.f.attrs["status"] = "running"
        self.f.attrs["status_message"] = ""
        self.f.flush()
        return self

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


def read_status(path: str | Path) -> tuple[str, int, str]:
    """(status, metric rows, config_yaml) of a results file; raises OSError if unreadable."""
    with h5py.File(path, "r") as f:
        cfg = f.attrs.get("config_yaml", "")
        return (str(f.attrs.get("status", "")), int(f["metrics/round"].shape[0]),
                cfg.decode() if isinstance(cfg, bytes) else str(cfg))


class ResultsFileError(ValueError):
    """A path that is not a readable qmlhfl_mpi results file."""


REQUIRED_METRICS = ("round", "test_accuracy", "uplink_bytes", "time_round")


def read_run(path: str | Path) -> dict[str, Any]:
    """``config_yaml``, ``status`` and every ``/metrics`` array of a results file.

    Opens without a file lock, so the file of a running job (flushed after every
    round) can be read.  Raises :class:`ResultsFileError` naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise ResultsFileError(f"results file {str(p)!r} not found")
    if p.is_dir():
        raise ResultsFileError(f"{str(p)!r} is a directory; give HDF5 result files (e.g. {str(p / '*.h5')!r})")
    try:
        if not h5py.is_hdf5(p):
            raise ResultsFileError(f"{str(p)!r} is not an HDF5 file; give the .h5 files written by 'qmlhfl-mpi run'")
        with h5py.File(p, "r", locking=False) as f:
            text = f.attrs.get("config_yaml")
            if text is None or "metrics" not in f:
                raise ResultsFileError(f"{str(p)!r} is an HDF5 file but not a qmlhfl-mpi results file "
                                       "(no 'config_yaml' attribute or no /metrics group)")
            missing = [k for k in REQUIRED_METRICS if k not in f["metrics"]]
            if missing:
                raise ResultsFileError(f"{str(p)!r}: /metrics lacks {missing}; not a qmlhfl-mpi results file "
                                       "or written by an incompatible version")
            metrics = {k: f["metrics"][k][()] for k in f["metrics"]}
            status = f.attrs.get("status", "unknown")
    except ResultsFileError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise ResultsFileError(f"cannot read {str(p)!r} as a qmlhfl-mpi results file: {e}") from None

    def text_of(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return {"config_yaml": text_of(text), "status": text_of(status), "metrics": metrics}
