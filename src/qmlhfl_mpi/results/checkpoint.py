"""Checkpoints: atomic, beside the results, everything a restart needs, with a digest.

The checkpoint of a run lives in ``<output>.ckpt`` (HDF5): attributes
``rounds_done``, ``config_yaml``, ``format`` and ``sha256``, the dataset
``model`` (the cloud model after ``rounds_done`` rounds), the group
``state`` (further named arrays of stateful parts) and the group ``metrics``
(the results file's ``/metrics`` rows of those rounds, so that a damaged
results file can be rebuilt: ``--resume --rebuild-results``).  It is written to a
temporary file, synced and renamed over the previous one, so a crash during
the write leaves the previous checkpoint intact.  Every random stream is keyed
by (seed, entity, round), so the model, the state and the round are all a
restart needs.

``sha256`` is the hex SHA-256 of :func:`checkpoint_digest` over exactly what
a restart uses; :func:`read_checkpoint` recomputes it and refuses a file whose
content no longer matches (a flipped bit on disk, a partial copy, an edit).
Checkpoints of the previous formats are still read: ``qmlhfl_mpi checkpoint 2``
(a digest, no metrics) and ``qmlhfl_mpi checkpoint 1`` (no digest, read with a
warning that it is unverified).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..core.text import clean_text

log = logging.getLogger(__name__)

FORMAT = "qmlhfl_mpi checkpoint 3"
"""The ``format`` attribute of the checkpoints written now (a ``sha256`` attribute, the metrics so far)."""
FORMAT_NO_METRICS = "qmlhfl_mpi checkpoint 2"
"""The previous format: a digest, but no metrics (still read; cannot rebuild a results file)."""
FORMAT_UNVERIFIED = "qmlhfl_mpi checkpoint 1"
"""The first format: no digest and no metrics (still read, with a warning)."""

_FIX = "restore the file from a copy, or pass --overwrite to start the run over"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, damaged or inconsistent."""


def checkpoint_path(output: str | Path) -> Path:
    """Where the checkpoint of the run writing ``output`` lives: ``<output>.ckpt``."""
    return Path(f"{output}.ckpt")


def _canonical(a: Any) -> np.ndarray:
    """``a`` as a C-contiguous little-endian array (the byte order the digest is defined in)."""
    arr = np.asarray(a)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def checkpoint_digest(model: np.ndarray, rounds_done: int, config_yaml: str,
                      state: Mapping[str, np.ndarray] | None = None, *, fmt: str = FORMAT,
                      metrics: Mapping[str, np.ndarray] | None = None, inputs: str = "") -> str:
    """Hex SHA-256 over everything a restart uses, each field length-prefixed.

    In order: the format string; ``rounds_done`` as a little-endian int64; the
    UTF-8 bytes of ``config_yaml``; the model; then, for every state entry in
    sorted name order, its UTF-8 name and its array; in the current format,
    the metrics likewise (their count, then each name and array in sorted
    name order).  An array contributes its
    dtype (``numpy`` ``dtype.str`` after conversion to little-endian), its shape
    and its raw C-order bytes.  Every variable-length piece is preceded by its
    length as a little-endian uint64, so no two different checkpoints hash the
    same bytes.  A checkpoint that names its input files (``inputs``: JSON of the config key, path and SHA-256 of
    each trace or matrix file the run reads) adds the marker ``inputs`` and that text last; one that does not
    hashes as before.
    """
    h = hashlib.sha256()

    def piece(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    def array(a: Any) -> None:
        arr = _canonical(a)
        piece(arr.dtype.str.encode())
        piece(b"".join(int(n).to_bytes(8, "little") for n in arr.shape))
        piece(arr.tobytes())

    piece(fmt.encode())
    h.update(int(rounds_done).to_bytes(8, "little", signed=True))
    piece(config_yaml.encode("utf-8"))
    array(np.asarray(model, dtype=np.float32))
    groups = [state or {}] + ([metrics or {}] if fmt == FORMAT else [])
    for entries in groups:
        h.update(len(entries).to_bytes(8, "little"))
        for name in sorted(entries):
            piece(name.encode("utf-8"))
            array(entries[name])
    if inputs:
        piece(b"inputs")
        piece(inputs.encode("utf-8"))
    return h.hexdigest()


def write_checkpoint(path: str | Path, *, model: np.ndarray, rounds_done: int, config_yaml: str,
                     state: Mapping[str, np.ndarray] | None = None,
                     metrics: Mapping[str, np.ndarray] | None = None, inputs: str = "") -> None:
    """Atomically replace the checkpoint at ``path`` (temp file, fsync, rename).

    ``state`` holds further named arrays (per-node optimiser state, ...) under
    ``/state``, ``metrics`` the per-round metrics so far under ``/metrics``; they
    come back in :attr:`Checkpoint.state` and :attr:`Checkpoint.metrics`.  The
    ``sha256`` attribute is the :func:`checkpoint_digest` of what is written.
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    config_yaml = clean_text(config_yaml)
    model32 = np.asarray(model, dtype=np.float32)
    arrays = {str(k): np.asarray(v) for k, v in (state or {}).items()}
    rows = {str(k): np.asarray(v) for k, v in (metrics or {}).items()}
    image = io.BytesIO()  # built in memory: HDF5 never writes to a disk that may fill (see space.py)
    with h5py.File(image, "w") as f:
        f.attrs["rounds_done"] = int(rounds_done)
        f.attrs["config_yaml"] = config_yaml
        f.attrs["format"] = FORMAT
        f.attrs["sha256"] = checkpoint_digest(model32, rounds_done, config_yaml, arrays, metrics=rows, inputs=inputs)
        if inputs:
            f.attrs["inputs"] = inputs
        f.create_dataset("model", data=model32)
        for group, entries in (("state", arrays), ("metrics", rows)):
            g = f.create_group(group)
            for k, v in entries.items():
                g.create_dataset(k, data=v)
    data = memoryview(image.getbuffer())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:  # plain writes fail cleanly (ENOSPC as OSError); the previous checkpoint is untouched until the rename
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(p.parent if str(p.parent) else ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class Checkpoint:
    """What a restart needs: the model after ``rounds_done`` rounds, the config and the per-node state; and
    the per-round metrics so far (``None`` in checkpoints of the formats before 3)."""

    model: np.ndarray
    rounds_done: int
    config_yaml: str
    state: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, np.ndarray] | None = None
    inputs: str = ""  # JSON: the input files the run read, with their SHA-256 ("" in older checkpoints)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint; :class:`CheckpointError` says what is wrong and what to do.

    A checkpoint of the current format must carry a ``sha256`` attribute that
    matches its content; one of the old format (no digest) is read with a
    logged warning.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    try:
        with h5py.File(p, "r") as f:
            fmt = _text(f.attrs["format"]) if "format" in f.attrs else None
            if fmt not in (FORMAT, FORMAT_NO_METRICS, FORMAT_UNVERIFIED) or "model" not in f:
                raise CheckpointError(f"{str(p)!r} is not a qmlhfl_mpi checkpoint (format attribute {fmt!r} or "
                                      f"model missing): it is damaged or another file; {_FIX}")
            stored = _text(f.attrs["sha256"]) if "sha256" in f.attrs else None
            model = f["model"][()]
            rounds = int(f.attrs["rounds_done"])
            cfg = _text(f.attrs["config_yaml"])
            state = {k: np.asarray(f["state"][k][()]) for k in f["state"]} if "state" in f else {}
            metrics = {k: np.asarray(f["metrics"][k][()]) for k in f["metrics"]} if "metrics" in f else None
            inputs = _text(f.attrs["inputs"]) if "inputs" in f.attrs else ""
    except CheckpointError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/ValueError (UnicodeDecodeError) on damaged files
        raise CheckpointError(f"checkpoint {str(p)!r} is damaged or unreadable (truncated or corrupt?): {e}; "
                              f"{_FIX}") from None
    if fmt == FORMAT_UNVERIFIED and stored is None:
        log.warning("checkpoint %r has the old format %r without a SHA-256 digest: its content cannot be verified; "
                    "resuming from it unchecked", str(p), fmt)
    elif stored is None:
        raise CheckpointError(f"checkpoint {str(p)!r} is damaged: its format {fmt!r} needs a sha256 attribute, which "
                              f"is missing; {_FIX}")
    else:
        found = checkpoint_digest(model, rounds, cfg, state, fmt=fmt, metrics=metrics, inputs=inputs)
        if found != stored:  # a digest beside the old format string: the format attribute is damaged
            raise CheckpointError(f"checkpoint {str(p)!r} is damaged: its content does not match its SHA-256 digest "
                                  f"(expected {stored[:16]}..., found {found[:16]}...); {_FIX}")
    if model.dtype != np.float32 or model.ndim != 1 or rounds < 1:
        raise CheckpointError(f"checkpoint {str(p)!r} is inconsistent: model {model.dtype}{model.shape}, "
                              f"rounds_done={rounds}; {_FIX}")
    if fmt == FORMAT and (metrics is None or any(len(v) != rounds for v in metrics.values())):
        raise CheckpointError(f"checkpoint {str(p)!r} is inconsistent: its metrics do not hold {rounds} rounds; "
                              f"{_FIX}")
    return Checkpoint(model, rounds, cfg, state, metrics if fmt == FORMAT else None, inputs)
