"""Disk space for the outputs: checks before a write, and a small reserve released on failure.

HDF5 does not fail cleanly on a full disk: a write that hits ``ENOSPC`` may
leave h5py's objects half-freed (errors reported as ``RuntimeError`` from
destructors) and can crash the interpreter.  So the writers never let it
get there: before every write they check that the file system has room for
it plus :data:`MARGIN` (:func:`require_space`), and raise a plain
``OSError(ENOSPC)`` instead.  A :class:`Reserve` file of :data:`RESERVE_BYTES`
is kept beside the output while a run writes it and deleted first when a
write fails, so that closing the results file (and recording its status)
has room even when another process filled the disk in between.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

MARGIN = 64 * 1024           # bytes kept free beyond every write's own size
RESERVE_BYTES = 256 * 1024   # the reserve file: room to close the results file after a failure

__all__ = ["MARGIN", "RESERVE_BYTES", "Reserve", "as_os_error", "free_bytes", "require_space"]


def free_bytes(directory: str | Path) -> int:
    """Bytes available to this user in the file system holding ``directory``."""
    d = Path(directory) if str(directory) else Path(".")
    return int(shutil.disk_usage(d).free)


def require_space(directory: str | Path, needed: int, what: str) -> None:
    """Raise ``OSError(ENOSPC)`` unless ``needed + MARGIN`` bytes are free in ``directory``."""
    free = free_bytes(directory)
    if free < needed + MARGIN:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {what} needs {needed + MARGIN:,} bytes "
                                    f"(with a {MARGIN // 1024} kB margin) and {free:,} are free")


_ERRNO = re.compile(r"errno = (\d+)")


def as_os_error(e: BaseException, what: str) -> OSError:
    """An ``OSError`` for a failed h5py call (h5py reports many I/O failures as ``RuntimeError``),
    with the errno of the underlying failure when the message carries one."""
    if isinstance(e, OSError) and e.errno is not None:
        return e
    m = _ERRNO.search(str(e))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, f"{os.strerror(code)} ({what}: {type(e).__name__}: {str(e).splitlines()[0][:200]})")


class Reserve:
    """A file of ``nbytes`` zeros at ``path`` while it is held (see the module doc)."""

    def __init__(self, path: str | Path, nbytes: int = RESERVE_BYTES) -> None:
        self.path = Path(path)
        self.nbytes = nbytes
        self.held = False

    def take(self) -> None:
        """Create the file; ``OSError`` (nothing left behind) if there is no room for it."""
        require_space(self.path.parent if str(self.path.parent) else ".", self.nbytes, "the space reserve")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            block = b"\0" * 65536
            left = self.nbytes
            while left > 0:
                left -= os.write(fd, block[: min(left, len(block))])
            os.fsync(fd)
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.held = True

    def release(self) -> None:
        """Delete the file (idempotent)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
