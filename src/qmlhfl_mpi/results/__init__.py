"""Results I/O: the HDF5 results file, checkpoints and output checks.  The only
package that imports h5py."""
from __future__ import annotations

from .checkpoint import (
           Checkpoint,
           CheckpointError,
           checkpoint_path,
           read_checkpoint,
           write_checkpoint,
)
from .output import output_problem
from .reader import REQUIRED_METRICS, ResultsFileError, read_run
from .writer import INT_SCALARS, LINK_METRICS, SCALAR_METRICS, ResultsWriter, read_status

__all__ = ["Checkpoint", "CheckpointError", "INT_SCALARS", "LINK_METRICS", "REQUIRED_METRICS", "ResultsFileError",
           "ResultsWriter", "SCALAR_METRICS", "checkpoint_path", "output_problem", "read_checkpoint", "read_run", "read_status",
           "write_checkpoint"]
