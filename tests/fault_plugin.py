"""Test-only fault injection through the callback API (never part of the library).

Loaded by the fault suite as a config callback, e.g.::

    --set 'callbacks=[{ref: tests/fault_plugin.py:Fault, args: {rank: 1, round: 3, mode: kill}}]'

Modes, all on rank ``rank``:

* ``raise``: raise inside round ``round``'s local training (the other ranks
  wait in a collective, so the job must be aborted);
* ``kill``: SIGKILL itself at the same point;
* ``ckpt``: SIGKILL itself half-way through writing the checkpoint after round
  ``round`` (the temporary file is cut to half, the rename never happens);
* ``delay``: sleep ``seconds`` after every round (so a signal lands mid-run);
* ``stop``: SIGSTOP itself inside round ``round``'s local training (a hung rank),
  after writing the time to ``path``/stopped_at when ``path`` is given;
* ``fill``: at the end of round ``round`` (after its row is written, before its
  checkpoint), fill the file system of ``path`` with ``path``/filler until
  only ``leave`` bytes are free (a disk that fills up during the run).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from qmlhfl_mpi import Callback
from qmlhfl_mpi.results import checkpoint as checkpoint_module


class Fault(Callback):
    def __init__(self, mode: str = "raise", rank: int = 0, round: int = 0, seconds: float = 0.0,
                 path: str = "", leave: int = 0) -> None:
        if mode not in ("raise", "kill", "ckpt", "delay", "stop", "fill"):
            raise ValueError(f"Fault mode={mode!r}")
        self.mode, self.rank, self.round, self.seconds = mode, rank, round, seconds
        self.path, self.leave = path, leave

    def on_run_start(self, session) -> None:
        if session.rank != self.rank or self.mode not in ("raise", "kill", "stop"):
            return
        executor, target, mode = session.executor, self.round, self.mode
        stamp = str(Path(self.path) / "stopped_at") if self.path else ""

        def fault(round_):
            if round_ == target:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == "stop":
                    if stamp:
                        Path(stamp).write_text(repr(time.time()))
                    os.kill(os.getpid(), signal.SIGSTOP)
                    return
                raise RuntimeError(f"injected fault on rank {session.rank} in round {round_}")

        # both training paths (one device at a time, and batched devices) are the executor's clients
        executor.clients = _Faulty(executor.clients, fault)

    def on_round_end(self, session, record) -> None:
        if self.mode == "delay":
            time.sleep(self.seconds)
        if self.mode == "fill" and session.rank == self.rank and int(record["round"]) == self.round:
            fill(Path(self.path), self.leave)
        if self.mode == "ckpt" and session.rank == self.rank and int(record["round"]) == self.round:
            real_replace = checkpoint_module.os.replace

            def crash(src, dst):
                if str(src).endswith(".ckpt.tmp"):
                    p = Path(src)
                    with open(p, "r+b") as f:
                        f.truncate(p.stat().st_size // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_replace(src, dst)

            checkpoint_module.os.replace = crash


class _Faulty:
    """The executor's clients, with ``fault(round)`` called before every local training."""

    def __init__(self, clients, fault):
        self.clients, self.fault = clients, fault

    def train(self, v, devices, round_, calls, peers, **kw):
        self.fault(round_)
        return self.clients.train(v, devices, round_, calls, peers, **kw)


def fill(directory: Path, leave: int) -> Path:
    """Write ``directory``/filler until about ``leave`` bytes are free in its file system."""
    filler = directory / "filler"
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def spec(mode: str, **args) -> str:
    """The ``--set callbacks=...`` value that loads :class:`Fault` (absolute path: any cwd works)."""
    inner = ", ".join(f"{k}: {v}" for k, v in {"mode": mode, **args}.items())
    return f"callbacks=[{{ref: '{Path(__file__).resolve()}:Fault', args: {{{inner}}}}}]"
