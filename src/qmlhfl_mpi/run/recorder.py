"""The session's collaborators on rank 0: the HDF5 results file and the checkpoint.

Both only write; the session calls them at round boundaries and agrees on
their errors (an ``OSError`` becomes exit 74 on every rank, with the advice
below).  A results file that this run created and that holds no round when
the run ends (it failed while starting) is removed, so a failure never leaves
an empty or half-written file behind; one that holds rounds records the
status.  The checkpoint carries the metric rows so far, from which
``--resume --rebuild-results`` writes a new results file when the old one is
damaged (the damaged one is kept under another name).
"""
from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..results import ResultsWriter, checkpoint_path, write_checkpoint
from ..results.space import RESERVE_BYTES, Reserve, require_space

APPEND_BYTES = 64 * 1024  # room one round's row may take (HDF5 allocates a chunk of 256 rows at a time)


ROW_BYTES = 512  # upper estimate of one round's metrics in a checkpoint


def checkpoint_bytes(num_params: int, state_vectors: int, config_yaml: str, rounds: int = 0) -> int:
    """Upper estimate of a checkpoint's size: the model and the state vectors in float32, the config, the
    metrics of ``rounds`` rounds, HDF5's metadata."""
    return (4 * num_params * (1 + state_vectors) + len(config_yaml.encode()) + 32 * 1024 + 512 * state_vectors
            + ROW_BYTES * rounds)


def start_bytes(num_params: int, state_vectors: int, config_yaml: str, rounds: int, rounds_done: int,
                devices: int, classes: int, fresh_file: bool) -> int:
    """Disk space a run needs before its first round: the space reserve, the checkpoint, the final model, the
    rows of the rounds so far and of two more, and (a new results file) its per-device topology."""
    return (RESERVE_BYTES + checkpoint_bytes(num_params, state_vectors, config_yaml, rounds) + 4 * num_params
            + (2 + rounds_done) * APPEND_BYTES + (8 * devices * (max(classes, 1) + 4) if fresh_file else 0))


def damaged_name(path: Path) -> Path:
    """A free name for a damaged results file: ``<output>.damaged``, else ``<output>.damaged.<k>``."""
    candidate = Path(f"{path}.damaged")
    k = 1
    while candidate.exists():
        candidate = Path(f"{path}.damaged.{k}")
        k += 1
    return candidate


def reserve_path(output: str | Path) -> Path:
    return Path(f"{output}.reserve")


log = logging.getLogger(__name__)


def io_advice(where: Path, e: OSError, after_round: int | None) -> str:
    """The message for a failed write: what, where, the cause and the fix."""
    after = f" after round {after_round}" if after_round is not None else ""
    return (f"writing results or the checkpoint in {str(where)!r}{after} failed: {e}. Free disk space or fix "
            "the directory's permissions, then continue with --resume (the last complete checkpoint is kept)")


class Checkpointer:
    """Writes ``<output>.ckpt`` every ``every`` rounds (0: only when a stop is agreed), and after the last round
    when it is to be ``keep``-t (``output.keep_checkpoint``); checks the space first (the new checkpoint is
    written beside the previous one, which stays until the rename)."""

    def __init__(self, output: str | Path, every: int, config_yaml: str, inputs: str = "", keep: bool = False) -> None:
        self.path = checkpoint_path(output)
        self.every, self.config_yaml, self.inputs = every, config_yaml, inputs  # inputs: the input files' digests
        self.keep = keep

    def due(self, done: int, total: int, stop: bool) -> bool:
        """Whether to checkpoint after ``done`` of ``total`` rounds (after the last only when it is kept)."""
        if done >= total:
            return self.keep and done == total
        return stop or (self.every > 0 and done % self.every == 0)

    def write(self, model: np.ndarray, done: int, state: Mapping[str, np.ndarray] | None = None,
              results: ResultsFile | None = None) -> None:
        """The checkpoint after ``done`` rounds: the cloud model, the per-node ``state`` and the metric rows of
        rounds ``0 .. done-1`` from ``results``."""
        metrics = results.history() if results is not None else None
        try:
            require_space(self.path.parent, checkpoint_bytes(model.size, len(state or {}), self.config_yaml, done),
                          f"the checkpoint {str(self.path)!r}")
            write_checkpoint(self.path, model=model, rounds_done=done, config_yaml=self.config_yaml, state=state,
                             metrics=metrics, inputs=self.inputs)
        except OSError as e:
            raise OSError(io_advice(self.path.parent, e, done - 1)) from None

    def remove(self) -> None:
        """The run completed: its checkpoint is no longer needed."""
        if self.path.exists():
            self.path.unlink()


class ResultsFile:
    """The run's HDF5 file: opened (or reopened after a resume, or rebuilt from the checkpoint), one row per
    round, the final model (see the module doc)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.writer: ResultsWriter | None = None
        self.reserve = Reserve(reserve_path(path))
        self.created = False  # this run created the file (removed at close if it holds no round)

    @contextmanager
    def _advice(self, after_round: int | None) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise OSError(io_advice(self.path.parent, e, after_round)) from None

    def open(self, *, overwrite: bool, start: int, attrs: Mapping[str, Any], topology: Mapping[str, np.ndarray],
             quantizer: Mapping[str, np.ndarray], num_links: int, initial: np.ndarray | None,
             metrics: Mapping[str, np.ndarray] | None = None, rebuild: bool = False,
             parents: np.ndarray | None = None) -> None:
        """Create the file, or reopen it after ``start`` rounds (its rows after ``start`` dropped, missing ones
        filled from the checkpoint's ``metrics``), or with ``rebuild`` write it anew from those ``metrics``
        (the damaged file, if any, is renamed first; nothing is overwritten).  ``initial`` is stored as
        ``/model/initial`` when given (the model cannot be recomputed from the seed).  On failure nothing of
        this call stays behind: a file it created is removed, the space reserve released.  ``parents``: the
        ``/topology/parents`` rows of the rounds before ``start`` (they replace the file's)."""
        with self._advice(None):
            try:
                self.reserve.take()
                if start and not rebuild:
                    self.writer = ResultsWriter.reopen(self.path, start, attrs)
                    if self.writer.rounds < start and metrics:  # rows the file lost: the checkpoint has them
                        self.writer.append_rows({k: v[self.writer.rounds : start] for k, v in metrics.items()})
                    if parents is not None:
                        self.writer.set_parents(parents)
                    return
                provenance: dict[str, Any] = {}
                if rebuild:
                    provenance = self._set_aside_damaged(start)
                stale = checkpoint_path(self.path)
                if overwrite and not start and stale.exists():
                    stale.unlink()
                self.created = overwrite or not self.path.exists()  # from here on the path is this run's
                self.writer = ResultsWriter(self.path, overwrite=overwrite, attrs={**attrs, **provenance},
                                            topology=topology, quantizer=quantizer, num_links=num_links)
                if initial is not None:
                    self.writer.write_model("initial", initial)
                if rebuild:
                    assert metrics is not None
                    self.writer.append_rows(metrics)
                    self.writer.mark_resumed(start)
                if parents is not None and len(parents):
                    self.writer.set_parents(parents)
            except BaseException:
                self._discard()
                raise

    def _set_aside_damaged(self, start: int) -> dict[str, Any]:
        """Rename the damaged results file (if there is one); the provenance attributes of the rebuilt file."""
        kept = ""
        if self.path.exists():
            target = damaged_name(self.path)
            self.path.rename(target)
            kept = str(target)
            log.warning("results file %s is damaged: kept as %s; rebuilding it from the checkpoint (%d rounds)",
                        self.path, target, start)
        return {"rebuilt_from": str(checkpoint_path(self.path)), "rebuilt_rounds": start, "damaged_file": kept,
                "rebuilt_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def _discard(self) -> None:
        """After a failed open: close what is open, remove a file this run created, release the reserve."""
        if self.writer is not None:
            try:
                self.writer.close("failed", "the run failed while opening its results")
            except OSError:
                pass
            self.writer = None
        if self.created:
            self._remove_created()
        self.reserve.release()

    def _remove_created(self) -> None:
        self.path.unlink(missing_ok=True)
        self.created = False
        log.info("removed %s: the run ended before its first round", self.path)

    def history(self) -> dict[str, np.ndarray]:
        """The metric rows of every round so far (what a checkpoint carries)."""
        assert self.writer is not None
        return self.writer.metrics()

    def append(self, record: Mapping[str, Any]) -> None:
        assert self.writer is not None
        with self._advice(int(record["round"])):
            require_space(self.path.parent, APPEND_BYTES, f"appending round {int(record['round'])} to "
                                                          f"{str(self.path)!r}")
            self.writer.append_round(record)

    def parents(self, rows: np.ndarray) -> None:
        """One round's ``/topology/parents`` rows (the devices whose edge changed)."""
        assert self.writer is not None
        if len(rows):
            with self._advice(int(rows[0, 0])):
                self.writer.set_parents(rows, append=True)

    def class_counts(self, devices: np.ndarray, counts: np.ndarray) -> None:
        """The class counts of ``devices`` (ascending), learnt since the file was opened."""
        assert self.writer is not None
        if len(devices):
            with self._advice(None):
                self.writer.update_rows("class_counts", devices, counts)

    def final(self, model: np.ndarray) -> None:
        assert self.writer is not None
        with self._advice(None):
            require_space(self.path.parent, 4 * model.size + 16 * 1024, f"the final model in {str(self.path)!r}")
            self.writer.write_model("final", model)

    def close(self, status: str, message: str) -> None:
        """Record ``status`` and close; a file this run created that holds no round is removed instead.  The
        space reserve is deleted first, so that this works after a full disk; a failure here is logged, never
        raised (the run's own error is the one to report)."""
        self.reserve.release()
        if self.writer is None:
            return
        try:
            empty = self.created and self.writer.rounds == 0
        except OSError:  # unreadable now: nothing of it can be trusted
            empty = self.created
        try:
            self.writer.close(status, message)
        except OSError as e:
            log.error("could not record status %r in %s: %s", status, self.path, e)
        self.writer = None
        if empty:
            self._remove_created()
        self.created = False
