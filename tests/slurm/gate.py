"""Test-only callback for tests/test_slurm.py (never part of the library): sleep ``seconds`` after every
round while the file ``path`` exists.

The requeue test slows the first run down this way, so that the signal it sends after the first checkpoint
always lands mid-run, and removes the file once SLURM has requeued the job: the resumed run (same arguments,
so the same callback) then goes at full speed instead of sleeping through every remaining round.  Loaded as
a config callback: ``--set callbacks=[{ref: '/abs/tests/slurm/gate.py:SlowWhile', args: {...}}]``.
"""
from __future__ import annotations

import time
from pathlib import Path

from qmlhfl_mpi import Callback


class SlowWhile(Callback):
    def __init__(self, path: str, seconds: float) -> None:
        self.path, self.seconds = Path(path), seconds

    def on_round_end(self, session, record) -> None:
        if self.path.exists():
            time.sleep(self.seconds)

