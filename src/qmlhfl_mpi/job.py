"""One training run on a communicator: set-up, the round loop, results,
checkpoints and restarts.

:func:`run_job` is collective over the communicator it is given; the entry
point (:mod:`qmlhfl_mpi.cli`) passes the world communicator.  Errors that every rank
can see coming (bad config, missing data, existing output, a bad checkpoint,
a failed write) are agreed on collectively so all ranks stop together with
one message and a documented exit code; anything else propagates and the
entry point aborts the job.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI

from . import __version__
from .aggregate import HierarchicalAggregator
from .comm import agree_on_error, broadcast_vector, build_layer_comms, max_over_ranks, sum_over_ranks
from .config import Config, config_diff
from .data import load_local_data
from .exitcodes import EXIT_DIVERGED, EXIT_IO, EXIT_PREEMPTED, EXIT_USAGE
from .placement import PlacementError, select_device
from .quantize import make_codec
from .theory import LatencyModel, round_time
from .topology import RankLayout, TopologyError, messages_per_round
from .train import LocalTrainer

log = logging.getLogger(__name__)


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


def threads_per_rank(cfg: Config) -> int:
    """``train.threads``, else ``SLURM_CPUS_PER_TASK``, else 1."""
    if cfg.train.threads:
        return cfg.train.threads
    try:
        return max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
    except ValueError:
        return 1


def _agree(comm: MPI.Intracomm, fn: Callable[[], Any], expected: tuple[type, ...], code: int = EXIT_USAGE) -> Any:
    """Run ``fn`` on every rank; if it raises one of ``expected`` anywhere, all
    ranks raise the same :class:`JobError`.  Collective."""
    result, msg = None, None
    try:
        result = fn()
    except expected as e:
        msg = str(e)
    agreed = agree_on_error(comm, msg)
    if agreed is not None:
        raise JobError(agreed, code)
    return result


def _preflight(cfg: Config, overwrite: bool, resume: bool) -> tuple[int, np.ndarray | None]:
    """Rank 0: check the output (and the checkpoint when resuming) before any work.
    Returns (rounds already done, checkpointed model or None)."""
    from .results import CheckpointError, checkpoint_path, output_problem, read_checkpoint, read_status

    out = Path(cfg.output.path)
    ck = checkpoint_path(out)
    if not resume:
        if ck.exists() and not overwrite:
            raise JobError(f"{str(out)!r} belongs to an interrupted run (its checkpoint {str(ck)!r} exists): "
                           "pass --resume to continue it, or --overwrite to start over")
        problem = output_problem(out, overwrite)
        if problem:
            raise JobError(problem)
        return 0, None
    if not out.exists():
        raise JobError(f"--resume: {str(out)!r} does not exist, so there is nothing to resume; run without --resume")
    try:
        status, rows, _ = read_status(out)
    except Exception as e:  # noqa: BLE001 - any h5py failure means unreadable
        raise JobError(f"--resume: results file {str(out)!r} is unreadable ({e}); nothing was changed. "
                       "Move it away and start a new run") from None
    if status == "completed":
        raise JobError(f"--resume: {str(out)!r} already holds a completed run of {rows} rounds; nothing to do. "
                       "Choose a new output.path to train again")
    try:
        ckpt = read_checkpoint(ck)
    except CheckpointError as e:
        raise JobError(f"cannot resume {str(out)!r}: {e}. Nothing was changed; pass --overwrite instead of "
                       "--resume to start over") from None
    diff = config_diff(ckpt.config_yaml, cfg)
    if diff:
        raise JobError(f"cannot resume {str(out)!r}: the config differs from the checkpoint's in keys that change "
                       f"results: {'; '.join(diff)}. Use the original config (the file's config_yaml attribute) "
                       "or start a new run with another output.path")
    if ckpt.rounds_done >= cfg.train.rounds:
        raise JobError(f"cannot resume {str(out)!r}: the checkpoint already has {ckpt.rounds_done} rounds and "
                       f"train.rounds={cfg.train.rounds}; raise train.rounds to train longer")
    if not os.access(out.parent if str(out.parent) else ".", os.W_OK):
        raise JobError(f"cannot resume {str(out)!r}: its directory is not writable")
    return ckpt.rounds_done, ckpt.model


def run_job(comm: MPI.Intracomm, cfg: Config, *, overwrite: bool = False, resume: bool = False,
            stop_requested: Callable[[], bool] = lambda: False,
            on_round: Callable[[dict], None] | None = None) -> RunSummary:
    """Train ``cfg`` on ``comm``; rank 0 writes the HDF5 file and checkpoints.  Collective."""
    from .datasets import DataError
    from .models import build_model, num_parameters
    from .results import CheckpointError, checkpoint_path

    rank, size = comm.Get_rank(), comm.Get_size()
    tree = cfg.build_tree()
    layout = _agree(comm, lambda: RankLayout.build(tree, size), (TopologyError,))
    pre = _agree(comm, lambda: _preflight(cfg, overwrite, resume) if rank == 0 else (0, None),
                 (JobError, CheckpointError, OSError))
    start = int(sum_over_ranks(comm, np.array([pre[0] if rank == 0 else 0]))[0])
    if rank == 0:
        log.info("tree %s on %d ranks; devices per rank %s; load imbalance %.2f%s", tree.describe(), size,
                 np.diff(layout.bounds).tolist()[:16], layout.load_imbalance(),
                 f"; resuming after round {start - 1}" if start else "")
    torch.set_num_threads(threads_per_rank(cfg))
    devices = layout.devices(rank)
    data = _agree(comm, lambda: load_local_data(cfg, tree, devices, rank, size), (DataError, ValueError, OSError))
    device = _agree(comm, lambda: select_device(comm, cfg.train.device, cfg.train.share_gpus), (PlacementError,))
    if device.type != "cpu":
        data.train = {k: (x.to(device), y.to(device)) for k, (x, y) in data.train.items()}
        data.test_x, data.test_y = data.test_x.to(device), data.test_y.to(device)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes, hidden=cfg.model.hidden, seed=cfg.train.seed)
    trainer = LocalTrainer(model, cfg.train.lr, cfg.train.batch_size, cfg.train.seed, device)
    dim = trainer.dim
    w = trainer.get_vector()  # identical on every rank: build_model seeds from cfg.train.seed
    if start:
        _agree(comm, lambda: _check_size(pre[1], dim) if rank == 0 else None, (JobError,))
        w = broadcast_vector(comm, pre[1] if rank == 0 else None, dim)

    codecs = [make_codec(s, cfg.quantizer.bucket) for s in cfg.quantizer.levels]
    samples = data.samples if cfg.topology.weighting == "samples" else None

    def train_fn(v: np.ndarray, dev: int, round_: int, call: int) -> tuple[np.ndarray, float, int]:
        x, y = data.train[dev]
        out, loss_sum = trainer.train(v, x, y, cfg.tau[0], dev, round_, call)
        return out, loss_sum, cfg.tau[0]

    comms = build_layer_comms(comm, layout)
    agg = HierarchicalAggregator(layout, rank, comms, codecs, cfg.tau, dim, cfg.train.seed, train_fn, samples)
    latency = LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())
    t_model = round_time(dim, cfg.tau, cfg.quantizer.levels, cfg.quantizer.bucket, tree, latency)

    class_counts = np.zeros((tree.num_devices, data.num_classes))
    for k, (_, y) in data.train.items():
        labels = y.cpu().numpy() if not y.is_floating_point() else np.zeros(len(y), dtype=np.int64)
        class_counts[k] = np.bincount(labels, minlength=data.num_classes)
    class_counts = sum_over_ranks(comm, class_counts).astype(np.int64)
    writer = _agree(comm, lambda: _open_writer(cfg, overwrite, start, comm, layout, data.samples, class_counts,
                                               codecs, dim, num_parameters(model)) if rank == 0 else None,
                    (OSError,), EXIT_IO)
    ckpt = checkpoint_path(cfg.output.path)
    status, message, done, acc = "completed", "", start, float("nan")
    try:
        for t in range(start, cfg.train.rounds):
            maybe_inject_fault(rank, t)
            t0 = time.perf_counter()
            w = agg.global_round(t, w)
            t_round = time.perf_counter() - t0
            st = agg.stats
            D = tree.num_devices  # per-device entries come from one rank each: the sums are exact
            totals = sum_over_ranks(comm, np.concatenate([st.loss, st.steps, st.uplink_bytes]))
            peaks = max_over_ranks(comm, np.array([st.t_compute, st.t_codec, st.t_comm, t_round,
                                                    float(stop_requested())]))
            evaluate = (t + 1) % cfg.train.eval_every == 0 or t == cfg.train.rounds - 1
            test_loss, t_eval = float("nan"), 0.0
            if evaluate:
                t1 = time.perf_counter()
                ev = trainer.evaluate(w, data.test_x, data.test_y, data.test_chunks, data.num_test_chunks)
                ev = sum_over_ranks(comm, ev).sum(axis=0)  # in chunk order: the same for any rank count
                t_eval = float(max_over_ranks(comm, np.array([time.perf_counter() - t1]))[0])
                test_loss = ev[0] / max(ev[2], 1)
                acc = ev[1] / max(ev[2], 1) if data.num_classes > 1 else float("nan")  # nan: regression
            train_loss = totals[:D].sum() / max(totals[D : 2 * D].sum(), 1)
            row = {
                "round": t, "test_accuracy": acc if evaluate else float("nan"), "test_loss": test_loss,
                "train_loss": train_loss, "uplink_bytes": totals[2 * D :].astype(np.int64),
                "time_compute": peaks[0], "time_codec": peaks[1], "time_comm": peaks[2],
                "time_round": peaks[3], "time_eval": t_eval, "modelled_time": t_model,
            }
            done = t + 1
            diverged = not (math.isfinite(train_loss) and np.isfinite(w).all())
            stop = bool(peaks[4]) and done < cfg.train.rounds
            every = cfg.output.checkpoint_every
            want_ckpt = not diverged and done < cfg.train.rounds and (stop or (every > 0 and done % every == 0))
            _agree(comm, lambda: _record(writer, row, ckpt, w, done, cfg, want_ckpt, rank) if rank == 0 else None,
                   (OSError,), EXIT_IO)
            if on_round is not None and rank == 0:
                on_round(row)
            if diverged:
                status = "diverged"
                message = (f"training diverged in round {t} (train loss {train_loss}, model finite: "
                           f"{bool(np.isfinite(w).all())}); lower the learning rate, e.g. "
                           f"--set train.lr={cfg.train.lr / 4:g} (now {cfg.train.lr:g})")
                break
            if stop:
                status = "preempted"
                message = (f"stopped by a signal after round {t}; checkpoint {str(ckpt)!r} holds {done} rounds. "
                           f"Continue with: qmlhfl-mpi run CONFIG --resume (exit code {EXIT_PREEMPTED})")
                break
        if status != "preempted":
            _agree(comm, lambda: _finish(writer, w, ckpt) if rank == 0 else None, (OSError,), EXIT_IO)
    except BaseException as e:
        if status == "completed":
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
    if status == "preempted":
        raise JobError(message, EXIT_PREEMPTED)
    return RunSummary(status, done, acc, cfg.output.path)


def _check_size(model: np.ndarray, dim: int) -> None:
    if model.size != dim:
        raise JobError(f"the checkpoint's model has {model.size} parameters but the configured model has {dim}")


def _record(writer, row: dict, ckpt: Path, w: np.ndarray, done: int, cfg: Config, want_ckpt: bool, rank: int) -> None:
    """Rank 0: append the round and, when due, replace the checkpoint."""
    from .results import write_checkpoint

    try:
        writer.append_round(row)
        if want_ckpt:
            hook = _fault_hook(rank, done - 1, "ckpt")
            write_checkpoint(ckpt, model=w, rounds_done=done, config_yaml=cfg.to_yaml(), crash_hook=hook)
    except OSError as e:
        raise OSError(_io_advice(ckpt, e, done)) from None


def _finish(writer, w: np.ndarray, ckpt: Path) -> None:
    """Rank 0: the final model; the checkpoint is no longer needed."""
    try:
        writer.write_model("final", w)
        if ckpt.exists():
            ckpt.unlink()
    except OSError as e:
        raise OSError(_io_advice(ckpt, e, None)) from None


def _io_advice(ckpt: Path, e: OSError, done: int | None) -> str:
    where = ckpt.parent if str(ckpt.parent) else Path(".")
    after = f" after round {done - 1}" if done else ""
    return (f"writing results or the checkpoint in {str(where)!r}{after} failed: {e}. Free disk space or fix "
            "the directory's permissions, then continue with --resume (the last complete checkpoint is kept)")


def _open_writer(cfg: Config, overwrite: bool, start: int, comm: MPI.Intracomm, layout: RankLayout,
                 samples: np.ndarray, class_counts: np.ndarray, codecs: list, dim: int, num_params: int):
    from .results import ResultsWriter, checkpoint_path

    tree = layout.tree
    attrs = {
        "config_yaml": cfg.to_yaml(), "version": __version__,
        "mpi_library": MPI.Get_library_version().strip(), "world_size": comm.Get_size(),
        "torch_version": torch.__version__, "numpy_version": np.__version__,
        "num_params": num_params, "N": tree.N, "threads_per_rank": threads_per_rank(cfg),
    }
    if start:
        return ResultsWriter.reopen(cfg.output.path, start, attrs)
    stale = checkpoint_path(cfg.output.path)
    if overwrite and stale.exists():
        stale.unlink()
    topo = {f"starts_{n}": tree.starts[n] for n in range(tree.N + 1)}
    topo["rank_blocks"] = layout.bounds
    topo["samples"] = samples
    topo["class_counts"] = class_counts
    quant = {
        "levels": np.array(cfg.quantizer.levels, dtype=np.int64),
        "bucket": np.array(cfg.quantizer.bucket, dtype=np.int64),
        "message_bytes": np.array([c.nbytes(dim) for c in codecs], dtype=np.int64),
        "messages_per_round": np.array([messages_per_round(tree, cfg.tau, n) for n in range(1, tree.N + 1)], dtype=np.int64),
        "q": np.array([c.variance(dim) for c in codecs], dtype=np.float64),
    }
    return ResultsWriter(cfg.output.path, overwrite=overwrite, attrs=attrs, topology=topo, quantizer=quant,
                         num_links=tree.N)


# ---- fault injection for the fault suite -----------------------------------
def _fault_spec() -> tuple[int, int, str] | None:
    spec = os.environ.get("QMLHFL_FAULT")
    if not spec:
        return None
    parts = spec.split(":")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0, parts[2] if len(parts) > 2 else "raise"


def _fault_hook(rank: int, round_: int, where: str) -> Callable[[], None] | None:
    spec = _fault_spec()
    if spec is None or spec != (rank, round_, where):
        return None
    return lambda: os.kill(os.getpid(), signal.SIGKILL)


def maybe_inject_fault(rank: int, round_: int) -> None:
    """Test hook ``QMLHFL_FAULT=RANK:ROUND[:MODE]``: at the start of that round, that
    rank raises (``raise``, the default) or kills itself with SIGKILL (``kill``);
    ``ckpt`` kills rank 0 half-way through writing that round's checkpoint.
    ``QMLHFL_ROUND_DELAY=SECONDS`` sleeps at the start of every round."""
    delay = os.environ.get("QMLHFL_ROUND_DELAY")
    if delay:  # tests: slow rounds down so a signal lands mid-run
        time.sleep(float(delay))
    spec = _fault_spec()
    if spec is None or spec[:2] != (rank, round_):
        return
    if spec[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec[2] == "raise":
        raise RuntimeError(f"injected fault on rank {rank} in round {round_} (QMLHFL_FAULT={os.environ['QMLHFL_FAULT']})")
