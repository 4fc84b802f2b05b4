"""A callback plug-in: early stopping on the best test accuracy.

Use it in a config as::

    callbacks:
      - ref: examples/callbacks.py:BestAccuracy
        args: {patience: 3, target: 0.9, path: results/examples/best.json}

``ref`` names a subclass of ``qmlhfl_mpi.Callback``; it is instantiated as
``BestAccuracy(**args)`` on every rank.  Its hooks run on every rank at the
round boundaries with the same ``record``, so every rank takes the same
decision; returning ``True`` from ``on_round_end`` asks the run to stop: the
session writes a checkpoint, the run ends ``preempted`` (exit code 75 from
``qmlhfl-mpi run``) and ``--resume`` continues it.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from qmlhfl_mpi import Callback

log = logging.getLogger(__name__)


class BestAccuracy(Callback):
    """Track the best test accuracy; ask to stop when it has not improved for
    ``patience`` evaluated rounds, or when it reaches ``target``.

    Rounds without an evaluation (``train.eval_every > 1``) have a NaN
    accuracy and are not counted.  On rank 0 it logs through
    ``logging.getLogger(__name__)`` and, if ``path`` is given, writes a
    one-line JSON summary there at the end of the run.  The state is not
    checkpointed: after a ``--resume`` the patience starts afresh.
    """

    def __init__(self, patience: int = 5, target: float | None = None, path: str | None = None) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise TypeError(f"patience={patience!r}: expected an integer >= 1")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
            raise TypeError(f"target={target!r}: expected a number (an accuracy in [0, 1]) or null")
        if path is not None and not isinstance(path, str):
            raise TypeError(f"path={path!r}: expected a file path or null")
        self.patience, self.target, self.path = patience, target, path
        self.best, self.best_round, self.stale, self.reason = -math.inf, -1, 0, None

    def on_run_start(self, session: Any) -> None:
        self.best, self.best_round, self.stale, self.reason = -math.inf, -1, 0, None

    def on_round_end(self, session: Any, record: Any) -> bool | None:
        acc = float(record["test_accuracy"])
        if not math.isfinite(acc):  # not evaluated this round (or a regression task)
            return None
        t = int(record["round"])
        if acc > self.best:
            self.best, self.best_round, self.stale = acc, t, 0
        else:
            self.stale += 1
        if self.target is not None and acc >= self.target:
            self.reason = f"test accuracy {acc:.4f} reached the target {self.target:g} in round {t}"
        elif self.stale >= self.patience:
            self.reason = (f"no improvement on the best test accuracy {self.best:.4f} (round {self.best_round}) "
                           f"for {self.stale} evaluated rounds")
        if self.reason is None:
            return None
        if session.rank == 0:
            log.info("BestAccuracy: asking to stop after round %d: %s", t, self.reason)
        return True

    def on_run_end(self, session: Any, summary: Any) -> None:
        if session.rank != 0:
            return
        best = self.best if math.isfinite(self.best) else None
        log.info("BestAccuracy: best test accuracy %s in round %d; run %s after %d rounds", best,
                 self.best_round, summary.status, summary.rounds_done)
        if self.path is None:
            return
        line = {"best_accuracy": best, "best_round": self.best_round, "status": summary.status,
                "rounds_done": summary.rounds_done, "stopped_because": self.reason}
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(line) + "\n")  # an OSError here ends the run with exit code 74
