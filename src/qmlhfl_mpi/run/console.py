"""The per-round console table (rank 0), with elapsed time and an estimate of the time left."""
from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING

from .callbacks import Callback, Record

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


class ConsoleTable(Callback):
    """One line per global round on ``stream`` (stdout), printed by rank 0.

    ``eta`` is the mean time of the rounds of this run so far times the rounds left.
    """

    HEADER = (f"{'round':>5} {'train_loss':>10} {'test_acc':>8} {'test_loss':>9} {'uplink_MB':>9} "
              f"{'compute_s':>9} {'codec_s':>7} {'comm_s':>7} {'elapsed':>8} {'eta':>8}")

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self._t0 = 0.0
        self._start = 0

    def _write(self, line: str) -> None:
        out = self.stream or sys.stdout
        out.write(line + "\n")
        out.flush()

    def on_run_start(self, session: Session) -> None:
        self._t0, self._start = time.monotonic(), session.start_round
        if session.rank == 0:
            self._write(self.HEADER)

    def on_round_end(self, session: Session, record: Record) -> None:
        if session.rank != 0:
            return
        elapsed = time.monotonic() - self._t0
        done = int(record["round"]) + 1 - self._start
        eta = elapsed / max(done, 1) * (session.rounds - int(record["round"]) - 1)
        self._write(f"{record['round']:>5} {record['train_loss']:>10.4f} {record['test_accuracy']:>8.4f} "
                    f"{record['test_loss']:>9.4f} {record['uplink_bytes'].sum() / 1e6:>9.3f} "
                    f"{record['time_compute']:>9.2f} {record['time_codec']:>7.3f} {record['time_comm']:>7.3f} "
                    f"{_clock(elapsed):>8} {_clock(eta):>8}")
