"""Checks of an output location before a run writes to it."""
from __future__ import annotations

import os
from pathlib import Path


def output_problem(path: str | Path, overwrite: bool) -> str | None:
    """Why the results file cannot be written, or ``None`` if it can."""
    p = Path(path)
    if p.exists() and not overwrite:
        return (f"output file {str(p)!r} already exists; refusing to overwrite a result. "
                "Choose another output.path (e.g. --set output.path=results/other.h5) or pass --overwrite")
    if p.exists() and p.is_dir():
        return f"output.path {str(p)!r} is a directory; give a file name such as {str(p / 'run.h5')!r}"
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent / f".qmlhfl-probe-{os.getpid()}"
    try:  # a real write: permission bits say nothing for root or read-only mounts
        parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return (f"cannot write the output file {str(p)!r}: {e.strerror or e} ({e.filename or parent}); "
                "choose a writable output.path, e.g. --set output.path=results/run.h5")
    return None
