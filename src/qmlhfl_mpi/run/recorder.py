"""The session's collaborators on rank 0: the HDF5 results file and the checkpoint.

Both only write; the session calls them at round boundaries and agrees on
their errors (an ``OSError`` becomes exit 74 on every rank, with the advice
below).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..results import ResultsWriter, checkpoint_path, write_checkpoint
from ..results.space import Reserve, require_space

APPEND_BYTES = 64 * 1024  # room one round's row may take (HDF5 allocates a chunk of 256 rows at a time)


def checkpoint_bytes(num_params: int, state_vectors: int, config_yaml: str) -> int:
    """Upper estimate of a checkpoint's size: the model and the state vectors in float32, the config, HDF5's
    metadata."""
    return 4 * num_params * (1 + state_vectors) + len(config_yaml.encode()) + 32 * 1024 + 512 * state_vectors


def reserve_path(output: str | Path) -> Path:
    return Path(f"{output}.reserve")


log = logging.getLogger(__name__)


def io_advice(where: Path, e: OSError, after_round: int | None) -> str:
    """The message for a failed write: what, where, the cause and the fix."""
    after = f" after round {after_round}" if after_round is not None else ""
    return (f"writing results or the checkpoint in {str(where)!r}{after} failed: {e}. Free disk space or fix "
            "the directory's permissions, then continue with --resume (the last complete checkpoint is kept)")


class Checkpointer:
    """Writes ``<output>.ckpt`` every ``every`` rounds (0: only when a stop is agreed); checks the space
    first (the new checkpoint is written beside the previous one, which stays until the rename)."""

    def __init__(self, output: str | Path, every: int, config_yaml: str) -> None:
        self.path = checkpoint_path(output)
        self.every, self.config_yaml = every, config_yaml

    def due(self, done: int, total: int, stop: bool) -> bool:
        """Whether to checkpoint after ``done`` of ``total`` rounds (never after the last)."""
        return done < total and (stop or (self.every > 0 and done % self.every == 0))

    def write(self, model: np.ndarray, done: int, state: Mapping[str, np.ndarray] | None = None) -> None:
        try:
            require_space(self.path.parent, checkpoint_bytes(model.size, len(state or {}), self.config_yaml),
                          f"the checkpoint {str(self.path)!r}")
            write_checkpoint(self.path, model=model, rounds_done=done, config_yaml=self.config_yaml, state=state)
        except OSError as e:
            raise OSError(io_advice(self.path.parent, e, done - 1)) from None

    def remove(self) -> None:
        """The run completed: its checkpoint is no longer needed."""
        if self.path.exists():
            self.path.unlink()


class ResultsFile:
    """The run's HDF5 file: opened (or reopened after a resume), one row per round, the final model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.writer: ResultsWriter | None = None
        self.reserve = Reserve(reserve_path(path))

    @contextmanager
    def _advice(self, after_round: int | None) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise OSError(io_advice(self.path.parent, e, after_round)) from None

    def open(self, *, overwrite: bool, start: int, attrs: Mapping[str, Any], topology: Mapping[str, np.ndarray],
             quantizer: Mapping[str, np.ndarray], num_links: int, initial: np.ndarray | None) -> None:
        """Create the file (or reopen it after ``start`` rounds); ``initial`` is
        stored as ``/model/initial`` when given (the model cannot be recomputed
        from the seed)."""
        with self._advice(None):
            self.reserve.take()
            if start:
                self.writer = ResultsWriter.reopen(self.path, start, attrs)
                return
            stale = checkpoint_path(self.path)
            if overwrite and stale.exists():
                stale.unlink()
            self.writer = ResultsWriter(self.path, overwrite=overwrite, attrs=attrs, topology=topology,
                                        quantizer=quantizer, num_links=num_links)
            if initial is not None:
                self.writer.write_model("initial", initial)

    def append(self, record: Mapping[str, Any]) -> None:
        assert self.writer is not None
        with self._advice(int(record["round"])):
            require_space(self.path.parent, APPEND_BYTES, f"appending round {int(record['round'])} to "
                                                          f"{str(self.path)!r}")
            self.writer.append_round(record)

    def final(self, model: np.ndarray) -> None:
        assert self.writer is not None
        with self._advice(None):
            require_space(self.path.parent, 4 * model.size + 16 * 1024, f"the final model in {str(self.path)!r}")
            self.writer.write_model("final", model)

    def close(self, status: str, message: str) -> None:
        """Record ``status`` and close.  The space reserve is deleted first, so that this works after a
        full disk; a failure here is logged, never raised (the run's own error is the one to report)."""
        self.reserve.release()
        if self.writer is not None:
            try:
                self.writer.close(status, message)
            except OSError as e:
                log.error("could not record status %r in %s: %s", status, self.path, e)
            self.writer = None
