"""A callback for benchmarks/scale.py: each rank's peak resident memory, written by rank 0.

Loaded as ``callbacks: [{ref: benchmarks/memory_probe.py:PeakMemory, args: {path: OUT.json}}]``.
"""
from __future__ import annotations

import json
import resource
import time
from typing import Any

from qmlhfl_mpi import Callback


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``ru_maxrss``, KiB on Linux), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory(Callback):
    def __init__(self, path: str) -> None:
        self.path, self.at_start, self.t_start = path, 0.0, 0.0

    def on_run_start(self, session: Any) -> None:
        self.at_start, self.t_start = peak_rss_mb(), time.time()

    def on_run_end(self, session: Any, summary: Any) -> None:
        rows = session.comm.gather({"rank": session.rank, "devices": len(session.devices),
                                    "peak_rss_mb_after_setup": self.at_start, "peak_rss_mb": peak_rss_mb(),
                                    "run_start_unix": self.t_start}, root=0)
        if session.rank == 0:
            with open(self.path, "w") as f:
                json.dump(rows, f)
