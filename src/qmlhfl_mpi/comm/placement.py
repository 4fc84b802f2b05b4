"""Which compute device each rank trains on (CPU, or a GPU chosen from the
rank's node-local index).  Collective over the communicator it is given."""
from __future__ import annotations

import logging
import os
import socket

import torch
from mpi4py import MPI

log = logging.getLogger(__name__)


class PlacementError(ValueError):
    """The requested device placement is impossible on this node."""


def select_device(comm: MPI.Intracomm, requested: str, share_gpus: bool) -> torch.device:
    """``cpu``, or ``cuda:<local rank mod GPUs>`` for ``cuda``/``auto``.  Collective.

    Ranks on one node are found with ``Split_type(COMM_TYPE_SHARED)``; with
    more ranks on a node than GPUs this raises :class:`PlacementError` unless
    ``share_gpus``.  Rank 0 logs the whole mapping once.
    """
    local_rank, local_size = node_local(comm)
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problem, device = None, torch.device("cpu")
    if requested == "cuda" and ngpu == 0:
        problem = (f"train.device is 'cuda' but no GPU is visible on {socket.gethostname()} "
                   "(torch.cuda.is_available() is False); use train.device: cpu or auto")
    elif requested in ("cuda", "auto") and ngpu > 0:
        if local_size > ngpu and not share_gpus:
            problem = (f"{local_size} ranks on node {socket.gethostname()} but only {ngpu} GPU(s): start at most "
                       f"{ngpu} ranks per node (e.g. srun --ntasks-per-node={ngpu}) or set train.share_gpus: true")
        else:
            device = torch.device(f"cuda:{local_rank % ngpu}")
    mapping = comm.gather((comm.Get_rank(), socket.gethostname(), str(device), problem), root=0)
    if comm.Get_rank() == 0:
        assert mapping is not None  # gather returns the list on the root
        log.info("device placement: %s", ", ".join(f"rank {r}@{h}: {d}" for r, h, d, _ in mapping))
    if problem is not None:
        raise PlacementError(problem)
    if device.type == "cuda":
        deterministic_cuda()
    return device


def deterministic_cuda() -> None:
    """Make a GPU rank's arithmetic a function of its inputs alone, so that a device's training gives
    the same bits on whichever rank (and GPU of the same kind) hosts it: deterministic cuDNN and
    cuBLAS kernels (``CUBLAS_WORKSPACE_CONFIG``, read when the first cuBLAS handle is made), no
    autotuning, and true float32 (no TF32) in matrix products and convolutions.  An operation that
    has no deterministic CUDA form warns (``warn_only``) instead of ending the run: the warning names
    it, and ``benchmarks/gpu_check.py`` shows whether the model still agrees across rank counts.
    Not collective."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def node_local(comm: MPI.Intracomm) -> tuple[int, int]:
    """This rank's index among the ranks of ``comm`` on its node, and how many there are
    (``Split_type(COMM_TYPE_SHARED)``).  Collective."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    rank, size = local.Get_rank(), local.Get_size()
    local.Free()
    return int(rank), int(size)


def ranks_on_node(comm: MPI.Intracomm) -> int:
    """How many ranks of ``comm`` share this rank's node.  Collective."""
    return node_local(comm)[1]


def mpi_library() -> str:
    """The MPI library's version text (``MPI_Get_library_version``), stripped; Open MPI's ends in NUL."""
    return MPI.Get_library_version().replace("\x00", "").strip()
