"""Per-round logs beside the HDF5 file: CSV (``output.csv``) and TensorBoard scalars (``output.tensorboard``).

Both are written by rank 0.  After a resume they continue the same log: the
CSV keeps its rows of the rounds already done and drops any later ones.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.exitcodes import EXIT_IO
from ..results import INT_SCALARS, LINK_METRICS, SCALAR_METRICS
from ..results.space import require_space
from .callbacks import Callback, Record
from .errors import RunError

if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import RunSummary
    from .session import Session


LOG_ROW_BYTES = 16 * 1024  # room checked before each row (the file system may fill while a run writes)


@contextmanager
def _log_io(path: Path, what: str) -> Iterator[None]:
    """An ``OSError`` of a log write, as exit 74 with the path, the cause and the fix."""
    try:
        yield
    except OSError as e:
        raise RunError(f"writing the {what} {str(path)!r} failed: {e.strerror or e}. Free disk space or fix the "
                       "directory's permissions, then continue with --resume (the results file and the last "
                       "complete checkpoint are kept), or turn the log off", EXIT_IO) from None


def csv_path(output: str | Path) -> Path:
    """The CSV log of the run writing ``output``: the same name with ``.csv``."""
    return Path(output).with_suffix(".csv")


class CSVLog(Callback):
    """One row per round: every scalar metric, then ``uplink_bytes_1..N``, ``messages_1..N``,
    ``downlink_bytes_1..N`` and ``dropped_1..N``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: Any = None
        self._writer: Any = None

    def header(self, num_links: int) -> list[str]:
        return [*SCALAR_METRICS, *(f"{k}_{n}" for k in LINK_METRICS for n in range(1, num_links + 1))]

    def on_run_start(self, session: Session) -> None:
        if session.rank != 0:
            return
        header = self.header(session.tree.N)
        rows: list[list[str]] = []
        if session.start_round and self.path.exists():
            with open(self.path, newline="") as f:
                old = list(csv.reader(f))
            if old and old[0] == header:  # rows of the rounds kept (a damaged row is dropped)
                rows = [r for r in old[1:] if r and r[0].isdigit() and int(r[0]) < session.start_round]
        with _log_io(self.path, "CSV log"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            require_space(self.path.parent, LOG_ROW_BYTES * (1 + len(rows)), f"the CSV log {str(self.path)!r}")
            self._file = open(self.path, "w", newline="")
            self._writer = csv.writer(self._file)
            self._writer.writerow(header)
            self._writer.writerows(rows)
            self._file.flush()

    def on_round_end(self, session: Session, record: Record) -> None:
        if self._writer is None:
            return
        with _log_io(self.path, "CSV log"):
            require_space(self.path.parent, LOG_ROW_BYTES, f"the CSV log {str(self.path)!r}")
            self._writer.writerow([int(record[k]) if k in INT_SCALARS else repr(float(record[k])) for k in SCALAR_METRICS]
                                  + [int(b) for k in LINK_METRICS for b in record[k]])
            self._file.flush()

    def on_run_end(self, session: Session, summary: RunSummary) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


class TensorBoardLog(Callback):
    """Scalars under ``test/``, ``train/``, ``uplink_MB/link_n`` and ``time/`` at step = rounds done."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self._writer: Any = None
        try:  # checked when the callback is made, before the run writes anything
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise RunError(f"output.tensorboard={str(self.logdir)!r} needs the tensorboard package ({e}); install "
                           "it with: pip install 'qmlhfl_mpi[tensorboard]' (or pip install tensorboard), or unset "
                           "output.tensorboard") from None

    def on_run_start(self, session: Session) -> None:
        if session.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        with _log_io(self.logdir, "TensorBoard log in"):
            self._writer = SummaryWriter(log_dir=str(self.logdir), purge_step=session.start_round + 1)

    def on_round_end(self, session: Session, record: Record) -> None:
        if self._writer is None:
            return
        step = int(record["round"]) + 1
        w = self._writer
        with _log_io(self.logdir, "TensorBoard log in"):  # its writer thread reports nothing: check the room here
            require_space(self.logdir, LOG_ROW_BYTES, f"the TensorBoard log in {str(self.logdir)!r}")
        for key in ("test_accuracy", "test_loss"):
            w.add_scalar(f"test/{key[5:]}", float(record[key]), step)
        w.add_scalar("train/loss", float(record["train_loss"]), step)
        for n, b in enumerate(record["uplink_bytes"], start=1):
            w.add_scalar(f"uplink_MB/link_{n}", float(b) / 1e6, step)
        for key in ("time_round", "time_compute", "time_codec", "time_comm", "modelled_time"):
            w.add_scalar(f"time/{key}", float(record[key]), step)
        w.flush()

    def on_run_end(self, session: Session, summary: RunSummary) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
