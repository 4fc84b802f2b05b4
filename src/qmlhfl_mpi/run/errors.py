"""The error every rank of a run raises together."""
from __future__ import annotations

from ..core.exitcodes import EXIT_USAGE


class RunError(Exception):
    """A problem all ranks agreed on; ``code`` is the process exit code (docs/hpc.md)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code
