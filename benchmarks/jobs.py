"""What several benchmarks share: the venv's ``mpiexec`` and running their jobs one after another or side by side.
Imported by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this directory is on ``sys.path``)."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def results(fn: Callable[..., Any], calls: Iterable[tuple], at_once: bool) -> Iterator[Any]:
    """``fn(*args)`` for each ``args`` of ``calls``, in order: one after another (lazily: the first failure
    stops), or all at once (the smoke's jobs: their times are not compared)."""
    calls = list(calls)
    if not at_once or len(calls) < 2:
        yield from (fn(*a) for a in calls)
        return
    with ThreadPoolExecutor(len(calls)) as pool:
        yield from pool.map(lambda a: fn(*a), calls)
