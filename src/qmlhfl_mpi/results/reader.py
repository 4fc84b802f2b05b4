"""Reading results files (for ``report`` and users): no locks, so a running job's file can be read."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py


class ResultsFileError(ValueError):
    """A path that is not a readable qmlhfl_mpi results file."""


REQUIRED_METRICS = ("round", "test_accuracy", "uplink_bytes", "time_round")


def read_run(path: str | Path) -> dict[str, Any]:
    """``config_yaml``, ``status`` and every ``/metrics`` array of a results file.

    Opens without a file lock, so the file of a running job (flushed after every
    round) can be read.  Raises :class:`ResultsFileError` naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise ResultsFileError(f"results file {str(p)!r} not found")
    if p.is_dir():
        raise ResultsFileError(f"{str(p)!r} is a directory; give HDF5 result files (e.g. {str(p / '*.h5')!r})")
    try:
        if not h5py.is_hdf5(p):
            raise ResultsFileError(f"{str(p)!r} is not an HDF5 file; give the .h5 files written by 'qmlhfl-mpi run'")
        with h5py.File(p, "r", locking=False) as f:
            text = f.attrs.get("config_yaml")
            if text is None or "metrics" not in f:
                raise ResultsFileError(f"{str(p)!r} is an HDF5 file but not a qmlhfl-mpi results file "
                                       "(no 'config_yaml' attribute or no /metrics group)")
            missing = [k for k in REQUIRED_METRICS if k not in f["metrics"]]
            if missing:
                raise ResultsFileError(f"{str(p)!r}: /metrics lacks {missing}; not a qmlhfl-mpi results file "
                                       "or written by an incompatible version")
            metrics = {k: f["metrics"][k][()] for k in f["metrics"]}
            status = f.attrs.get("status", "unknown")
    except ResultsFileError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise ResultsFileError(f"cannot read {str(p)!r} as a qmlhfl-mpi results file: {e}") from None

    def text_of(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return {"config_yaml": text_of(text), "status": text_of(status), "metrics": metrics}
