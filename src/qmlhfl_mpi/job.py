"""One training run on a communicator: set-up, the round loop, results.

:func:`run_job` is collective over the communicator it is given; the entry
point (:mod:`qmlhfl_mpi.cli`) passes ``COMM_WORLD``.  Errors that every rank
can see coming (bad config, missing data, existing output) are agreed on
collectively so all ranks stop together with one message; anything else
propagates and the entry point aborts the job.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

from . import __version__, rng
from .aggregate import HierarchicalAggregator
from .comm import agree_on_error, build_layer_comms, max_over_ranks, sum_over_ranks
from .config import Config
from .data import load_local_data
from .quantize import make_codec
from .topology import RankLayout, TopologyError, messages_per_round
from .train import LocalTrainer

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2      # bad config / data / output: nothing was run
EXIT_DIVERGED = 3   # non-finite loss or model: results so far are kept


class JobError(Exception):
    """A problem all ranks agreed on; ``code`` is the process exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RunSummary:
    status: str
    rounds_done: int
    final_accuracy: float
    path: str


def _threads(cfg: Config) -> int:
    if cfg.train.threads:
        return cfg.train.threads
    try:
        return max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
    except ValueError:
        return 1


def _agree(comm: MPI.Intracomm, fn: Callable[[], object], expected: tuple[type, ...]) -> object:
    """Run ``fn`` on every rank; if it raises one of ``expected`` anywhere, all
    ranks raise the same :class:`JobError`.  Collective."""
    result, msg = None, None
    try:
        result = fn()
    except expected as e:
        msg = str(e)
    agreed = agree_on_error(comm, msg)
    if agreed is not None:
        raise JobError(agreed)
    return result


def run_job(comm: MPI.Intracomm, cfg: Config, *, overwrite: bool = False,
            on_round: Callable[[dict], None] | None = None) -> RunSummary:
    """Train ``cfg`` on ``comm``; rank 0 writes the HDF5 file.  Collective."""
    from .datasets import DataError
    from .models import build_model, num_parameters
    from .results import output_problem

    rank, size = comm.Get_rank(), comm.Get_size()
    tree = cfg.build_tree()
    layout = _agree(comm, lambda: RankLayout.build(tree, size), (TopologyError,))
    _agree(comm, lambda: _raise_if(output_problem(cfg.output.path, overwrite) if rank == 0 else None), (JobError,))
    if rank == 0:
        log.info("tree %s on %d ranks; devices per rank %s; load imbalance %.2f", tree.describe(), size,
                 np.diff(layout.bounds).tolist()[:16], layout.load_imbalance())
    torch.set_num_threads(_threads(cfg))
    devices = layout.devices(rank)
    data = _agree(comm, lambda: load_local_data(cfg, tree, devices, rank, size), (DataError, ValueError, OSError))
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, hidden=cfg.model.hidden, seed=cfg.train.seed)
    trainer = LocalTrainer(model, cfg.train.lr, cfg.train.batch_size, cfg.train.seed)
    dim = trainer.dim
    w = trainer.get_vector()  # identical on every rank: build_model seeds from cfg.train.seed

    codecs = [make_codec(s, cfg.quantizer.bucket) for s in cfg.quantizer.levels]
    samples = data.samples if cfg.topology.weighting == "samples" else None

    def train_fn(v: np.ndarray, device: int, round_: int, call: int) -> tuple[np.ndarray, float, int]:
        x, y = data.train[device]
        out, loss_sum = trainer.train(v, x, y, cfg.tau[0], device, round_, call)
        return out, loss_sum, cfg.tau[0]

    comms = build_layer_comms(comm, layout)
    agg = HierarchicalAggregator(layout, rank, comms, codecs, cfg.tau, dim, cfg.train.seed, train_fn, samples)
    try:  # TEMP until theory lands
        from .theory import LatencyModel, round_time
        latency = LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())
        t_model = round_time(dim, cfg.tau, cfg.quantizer.levels, cfg.quantizer.bucket, tree, latency)
    except ImportError:
        t_model = float("nan")

    writer = _agree(comm, lambda: _open_writer(cfg, overwrite, comm, layout, data.samples, codecs, dim,
                                               num_parameters(model)) if rank == 0 else None, (OSError,))
    status, message, done, acc = "completed", "", 0, float("nan")
    try:
        for t in range(cfg.train.rounds):
            maybe_inject_fault(rank, t)
            t0 = time.perf_counter()
            w = agg.global_round(t, w)
            t_round = time.perf_counter() - t0
            st = agg.stats
            totals = sum_over_ranks(comm, np.concatenate([[st.loss_sum, st.steps], st.uplink_bytes]))
            times = max_over_ranks(comm, np.array([st.t_compute, st.t_codec, st.t_comm, t_round]))
            evaluate = (t + 1) % cfg.train.eval_every == 0 or t == cfg.train.rounds - 1
            test_loss, t_eval = float("nan"), 0.0
            if evaluate:
                t1 = time.perf_counter()
                ev = sum_over_ranks(comm, np.array(trainer.evaluate(w, data.test_x, data.test_y), dtype=np.float64))
                t_eval = float(max_over_ranks(comm, np.array([time.perf_counter() - t1]))[0])
                test_loss, acc = ev[0] / max(ev[2], 1), ev[1] / max(ev[2], 1)
            train_loss = totals[0] / max(totals[1], 1)
            row = {
                "round": t, "test_accuracy": acc if evaluate else float("nan"), "test_loss": test_loss,
                "train_loss": train_loss, "uplink_bytes": totals[2:].astype(np.int64),
                "time_compute": times[0], "time_codec": times[1], "time_comm": times[2],
                "time_round": times[3], "time_eval": t_eval, "modelled_time": t_model,
            }
            done = t + 1
            if writer is not None:
                writer.append_round(row)
            if on_round is not None and rank == 0:
                on_round(row)
            if not (math.isfinite(train_loss) and np.isfinite(w).all()):
                status = "diverged"
                message = (f"training diverged in round {t} (train loss {train_loss}, model finite: "
                           f"{bool(np.isfinite(w).all())}); lower the learning rate, e.g. "
                           f"--set train.lr={cfg.train.lr / 4:g} (now {cfg.train.lr:g})")
                break
        if writer is not None:
            writer.write_model("final", w)
    except BaseException as e:
        status, message = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        if writer is not None:
            writer.close(status, message)
        for lc in comms:
            if lc is not None:
                lc.free()
    if status == "diverged":
        raise JobError(message, EXIT_DIVERGED)
    return RunSummary(status, done, acc, cfg.output.path)


def _raise_if(message: str | None) -> None:
    if message is not None:
        raise JobError(message)


def _open_writer(cfg: Config, overwrite: bool, comm: MPI.Intracomm, layout: RankLayout,
                 samples: np.ndarray, codecs: list, dim: int, num_params: int):
    from .results import ResultsWriter

    tree = layout.tree
    attrs = {
        "config_yaml": cfg.to_yaml(), "version": __version__,
        "mpi_library": MPI.Get_library_version().strip(), "world_size": comm.Get_size(),
        "torch_version": torch.__version__, "numpy_version": np.__version__,
        "num_params": num_params, "N": tree.N, "threads_per_rank": _threads(cfg),
    }
    topo = {f"starts_{n}": tree.starts[n] for n in range(tree.N + 1)}
    topo["rank_blocks"] = layout.bounds
    topo["samples"] = samples
    quant = {
        "levels": np.array(cfg.quantizer.levels, dtype=np.int64),
        "bucket": np.array(cfg.quantizer.bucket, dtype=np.int64),
        "message_bytes": np.array([c.nbytes(dim) for c in codecs], dtype=np.int64),
        "messages_per_round": np.array([messages_per_round(tree, cfg.tau, n) for n in range(1, tree.N + 1)], dtype=np.int64),
        "q": np.array([c.variance(dim) for c in codecs], dtype=np.float64),
    }
    return ResultsWriter(cfg.output.path, overwrite=overwrite, attrs=attrs, topology=topo, quantizer=quant,
                         num_links=tree.N)


def maybe_inject_fault(rank: int, round_: int) -> None:
    """Test hook: ``QMLHFL_FAULT=RANK:ROUND`` makes that rank raise in that round."""
    spec = os.environ.get("QMLHFL_FAULT")
    if not spec:
        return
    r, _, t = spec.partition(":")
    if int(r) == rank and int(t or 0) == round_:
        raise RuntimeError(f"injected fault on rank {rank} in round {round_} (QMLHFL_FAULT={spec})")
