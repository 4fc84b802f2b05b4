"""Checkpoints: atomic, beside the results, everything a restart needs.

The checkpoint of a run lives in ``<output>.ckpt`` (HDF5): attributes
``rounds_done``, ``config_yaml`` and ``format``, the dataset ``model`` (the
cloud model after ``rounds_done`` rounds) and the group ``state`` (further
named arrays of stateful parts).  It is written to a temporary file, synced
and renamed over the previous one, so a crash during the write leaves the
previous checkpoint intact.  Every random stream is keyed by (seed, entity,
round), so the model, the state and the round are all a restart needs.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or inconsistent."""


def checkpoint_path(output: str | Path) -> Path:
    """Where the checkpoint of the run writing ``output`` lives: ``<output>.ckpt``."""
    return Path(f"{output}.ckpt")


def write_checkpoint(path: str | Path, *, model: np.ndarray, rounds_done: int, config_yaml: str,
                     state: Mapping[str, np.ndarray] | None = None) -> None:
    """Atomically replace the checkpoint at ``path`` (temp file, fsync, rename).

    ``state`` holds further named arrays (per-node optimiser state, ...) under
    ``/state``; they come back in :attr:`Checkpoint.state`.
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["rounds_done"] = int(rounds_done)
        f.attrs["config_yaml"] = config_yaml
        f.attrs["format"] = "qmlhfl_mpi checkpoint 1"
        f.create_dataset("model", data=np.asarray(model, dtype=np.float32))
        g = f.create_group("state")
        for k, v in (state or {}).items():
            g.create_dataset(k, data=v)
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
    state: dict[str, np.ndarray] = field(default_factory=dict)


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
            state = {k: f["state"][k][()] for k in f["state"]} if "state" in f else {}
    except CheckpointError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/ValueError on damaged files
        raise CheckpointError(f"checkpoint {str(p)!r} is unreadable (truncated or corrupt?): {e}") from None
    if model.dtype != np.float32 or model.ndim != 1 or rounds < 1:
        raise CheckpointError(f"checkpoint {str(p)!r} is inconsistent: model {model.dtype}{model.shape}, rounds_done={rounds}")
    return Checkpoint(model, rounds, cfg.decode() if isinstance(cfg, bytes) else str(cfg), state)
