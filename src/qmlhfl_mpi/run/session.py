"""A training run on a communicator: :class:`Session` builds it, :meth:`Session.run` drives it.

``Session(cfg, comm)`` turns the config into runtime objects once, at the
edge (tree, rank layout, codecs, data, model, trainer, communicators,
aggregator); ``run(callbacks)`` trains the global rounds, with the HDF5 file
and the checkpoint as collaborators and everything optional (console table,
CSV, TensorBoard, signals, the user's own) as callbacks.  Both are collective
over ``comm``.

Errors every rank can see coming (bad config, data or plug-in, existing
output, a bad checkpoint, a failed write, a callback that raised) are agreed
on collectively, so all ranks raise the same :class:`RunError` with one
message and a documented exit code.  An unexpected exception inside a round
(where the other ranks wait in a collective) aborts the job on a
communicator of more than one rank.
"""
from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from .. import __version__
from ..comm.aggregate import HierarchicalAggregator
from ..comm.collectives import (
    agree,
    broadcast_vector,
    gather_named_vectors,
    max_over_ranks,
    scatter_named_vectors,
    sum_over_ranks,
)
from ..comm.communicators import build_layer_comms
from ..comm.placement import PlacementError, ranks_on_node, select_device
from ..comm.watchdog import PeerFailed, RoundTimeout, Watchdog
from ..config import Config, callback_specs
from ..config import build as edge
from ..config.sizing import check_memory, recheck_memory
from ..core.exitcodes import EXIT_ABORT, EXIT_IO, EXIT_TIMEOUT, EXIT_USAGE
from ..core.memory import MemoryEstimateError
from ..core.participation import expected_messages
from ..core.registry import PluginError, load_reference
from ..core.theory import round_time
from ..core.topology import RankLayout, TopologyError, messages_per_round
from ..data.source import DataError
from ..learning.train import LocalTrainer
from ..learning.vectorized import VectorTrainer, use_vectorized
from ..results import CheckpointError
from ..results.space import RESERVE_BYTES, require_space
from .callbacks import Callback
from .errors import RunError
from .lock import OutputLock
from .logs import CSVLog, TensorBoardLog, csv_path
from .preflight import Start, preflight
from .recorder import APPEND_BYTES, Checkpointer, ResultsFile, checkpoint_bytes

log = logging.getLogger(__name__)

__all__ = ["RunSummary", "Session", "threads_per_rank"]


@dataclass(frozen=True)
class RunSummary:
    """How a run ended: ``completed``, ``preempted`` (stopped by a signal or a
    callback after a checkpoint: resume it) or ``diverged``."""

    status: str
    rounds_done: int
    final_accuracy: float
    path: str
    message: str = ""


def threads_per_rank(threads: int) -> int:
    """``train.threads``, else ``SLURM_CPUS_PER_TASK``, else 1."""
    if threads:
        return threads
    try:
        return max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
    except ValueError:
        return 1


def _code_of(e: BaseException) -> int:
    if isinstance(e, RunError):
        return e.code
    return EXIT_IO if isinstance(e, OSError) else EXIT_ABORT


class Session:
    """One run of ``cfg`` on ``comm`` (default ``MPI.COMM_WORLD``; any intracommunicator,
    ``COMM_SELF`` included).  Construction is collective: it builds every runtime
    object and raises :class:`RunError` on every rank if any rank cannot.

    Attributes callbacks may read: ``comm``, ``rank``, ``size``, ``config``,
    ``tree``, ``layout``, ``devices`` (this rank's), ``codecs``, ``data``,
    ``model``, ``trainer``, ``aggregator``, ``device``, ``vectors`` (the aggregation's
    backend), ``num_params``, ``rounds``,
    ``start_round``, ``round`` (the last finished round, -1 before the first)
    and ``model_vector`` (the cloud model after it).
    """

    def __init__(self, cfg: Config, comm: MPI.Intracomm | None = None) -> None:
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.watchdog: Watchdog | None = None
        self._comms: list[Any] = []
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.config = cfg
        self.rounds = cfg.train.rounds
        try:
            self._build(cfg)
        except BaseException:
            self.close()  # the communicators built so far
            raise

    def _build(self, cfg: Config) -> None:
        """Every runtime object, each step agreed on (see :meth:`_agree`).  Collective."""
        local_ranks = ranks_on_node(self.comm)
        sized = self._agree(lambda: check_memory(cfg, self.size, local_ranks), (MemoryEstimateError,),
                            stage="estimating the memory per rank")
        self.tree = self._agree(cfg.build_tree, (TopologyError, ValueError), stage="building the tree")
        self.layout: RankLayout = self._agree(lambda: RankLayout.build(self.tree, self.size), (TopologyError,),
                                              stage="placing devices on ranks")
        self.devices = self.layout.devices(self.rank)
        busiest = int(np.diff(self.layout.bounds).max())
        self._agree(lambda: recheck_memory(sized, busiest, local_ranks, cfg.train.memory_limit_gb),
                    (MemoryEstimateError,), stage="estimating the memory per rank")
        torch.set_num_threads(threads_per_rank(cfg.train.threads))
        self.data = self._agree(lambda: edge.local_data(cfg, self.tree, self.devices, self.rank, self.size),
                                (DataError, ValueError, OSError), stage="loading the data")
        self.device = self._agree(lambda: select_device(self.comm, cfg.train.device, cfg.train.share_gpus),
                                  (PlacementError,), stage="choosing the training device")
        if self.device.type != "cpu":
            self.data.to(self.device)
        self.model = self._agree(lambda: edge.model(cfg, self.data.input_shape, self.data.num_classes),
                                 (PluginError, ValueError), stage="building the model")
        sizes = tuple(p.numel() for p in self.model.parameters())
        self.codecs = self._agree(lambda: edge.codecs(cfg, sizes), (PluginError, ValueError),
                                  stage="building the codecs")
        self.link_options = self._agree(lambda: edge.link_options(cfg, sizes), (PluginError, ValueError),
                                        stage="building the link options")
        self.trainer = self._agree(lambda: LocalTrainer(self.model, cfg.train.lr, cfg.train.batch_size,
                                                        cfg.train.seed, self.device, opt=edge.client_optimizer(cfg),
                                                        schedule=edge.lr_schedule(cfg)),
                                   (ValueError,), stage="building the trainer")
        self.num_params = self.trainer.dim
        initial = self.trainer.get_vector()
        if cfg.model.init == "module":  # the factory's own init: rank 0's model for everyone
            initial = broadcast_vector(self.comm, initial if self.rank == 0 else None, self.num_params)
        self.initial_vector = initial
        self.model_vector = initial
        self.start_round, self.round = 0, -1
        self._comms = build_layer_comms(self.comm, self.layout)
        tau = cfg.tau[0]

        def train_fn(v: Any, dev: int, round_: int, call: int) -> tuple[Any, float, int]:
            x, y = self.data.train[dev]
            out, loss_sum = self.trainer.train(v, x, y, tau, dev, round_, call)
            return out, loss_sum, tau

        self.vectorized = self._agree(lambda: use_vectorized(cfg.train.vectorize, self.model, self.num_params),
                                      (ValueError,), stage="choosing the batched trainer")
        many_fn = None
        if self.vectorized:
            batched = VectorTrainer(self.trainer)

            def many_fn(v: Any, devs: Sequence[int], round_: int, calls: Sequence[int], group: range
                        ) -> list[tuple[Any, float, int]]:
                res = batched.train_many(v, [self.data.train[d] for d in devs], tau, devs, round_, calls, group)
                return [(x, loss, tau) for x, loss in res]

        samples = self.data.samples if cfg.topology.weighting == "samples" else None
        self.vectors = self._agree(lambda: edge.vectors(cfg.train.aggregate_on, self.device), (ValueError,),
                                   stage="choosing the aggregation's vectors")
        self.aggregator = self._agree(
            lambda: HierarchicalAggregator(self.layout, self.rank, self._comms, self.codecs, cfg.tau,
                                           self.num_params, cfg.train.seed, train_fn, samples, many_fn,
                                           self.link_options, self.vectors),
            (ValueError,), stage="building the aggregator")
        self.modelled_round_time = round_time(self.num_params, cfg.tau, self.codecs, self.tree, edge.latency(cfg))
        self._ran = False
        self._lock = OutputLock(cfg.output.path)
        # the round's control channel: failure notices, and the round deadline (train.round_timeout) from a
        # round's start to its boundary agreement
        if self.size > 1 or cfg.train.round_timeout > 0:
            self.watchdog = Watchdog(self.comm, cfg.train.round_timeout)
        self.aggregator.guard = self.watchdog

    # ---- agreement ------------------------------------------------------------
    def _agree(self, fn: Callable[[], Any], expected: tuple[type[BaseException], ...],
               code: int = EXIT_USAGE, stage: str = "starting the run") -> Any:
        """Run ``fn`` on every rank; if it raises anywhere, every rank raises the same :class:`RunError`.
        One of ``expected`` gives ``code`` (its own for a ``RunError`` or ``OSError``) and its message; any
        other exception is unexpected: exit 1, its type and message, and the traceback in the failing
        rank's log.  ``fn`` must not be collective past the point where it may raise.  Collective."""
        result, msg = None, None
        try:
            result = fn()
        except expected as e:
            msg = f"{_code_of(e) if isinstance(e, (RunError, OSError)) else code}|{e}"
        except Exception as e:  # noqa: BLE001 - unexpected: every rank still stops together, cleanly
            log.error("unexpected error on rank %d while %s:\n%s", self.rank, stage, traceback.format_exc())
            msg = (f"{EXIT_ABORT}|unexpected error on rank {self.rank} while {stage}: {type(e).__name__}: {e} "
                   "(the traceback is in that rank's log; please report it)")
        self._raise_agreed(msg)
        return result

    def _on_rank0(self, stage: str, write: Callable[..., None], *args: Any) -> None:
        """``write(*args)`` on rank 0 (results and checkpoints); a failed write is exit 74 everywhere.
        ``stage`` says what is being done, for an unexpected error's message.  Collective."""
        self._agree(lambda: write(*args) if self.rank == 0 else None, (OSError,), EXIT_IO, stage=stage)

    def _raise_agreed(self, msg: str | None, stop: bool = False) -> bool:
        agreed, any_stop = agree(self.comm, msg, stop, self.watchdog)
        if agreed is not None:
            code, _, text = agreed.partition("|")
            raise RunError(text, int(code))
        return any_stop

    def _hooks(self, callbacks: Sequence[Callback], name: str, *args: Any) -> bool:
        """Call hook ``name`` of every callback on this rank; agree on errors and stop votes.  Collective."""
        msg, stop = None, False
        for cb in callbacks:
            try:
                stop = bool(getattr(cb, name)(self, *args)) or stop
            except Exception as e:  # noqa: BLE001 - a callback's failure must reach every rank
                if not isinstance(e, (RunError, OSError)):
                    log.error("callback %s.%s failed on rank %d:\n%s", type(cb).__name__, name, self.rank,
                              traceback.format_exc())
                text = str(e) if isinstance(e, (RunError, OSError)) else \
                    f"callback {type(cb).__name__}.{name} failed on rank {self.rank}: {type(e).__name__}: {e}"
                msg = msg or f"{_code_of(e)}|{text}"
        return self._raise_agreed(msg, stop)

    # ---- the run ----------------------------------------------------------------
    def config_callbacks(self) -> list[Callback]:
        """The callbacks the config asks for: ``output.csv``, ``output.tensorboard``, ``callbacks``."""
        out: list[Callback] = []
        if self.config.output.csv:
            out.append(CSVLog(csv_path(self.config.output.path)))
        if self.config.output.tensorboard:
            out.append(TensorBoardLog(self.config.output.tensorboard))
        for ref, args in callback_specs(self.config.callbacks):
            factory = load_reference(ref)
            if not callable(factory):
                raise PluginError(f"callback {ref!r}: {factory!r} is not callable; name a Callback subclass or a "
                                  "function returning a Callback")
            try:
                cb = factory(**args)
            except Exception as e:  # noqa: BLE001 - anything the user's constructor raises
                raise PluginError(f"callback {ref!r} with args {args!r}: {type(e).__name__}: {e}") from None
            if not isinstance(cb, Callback):
                raise PluginError(f"callback {ref!r} gave {type(cb).__name__}, not a qmlhfl_mpi.Callback; "
                                  "subclass qmlhfl_mpi.Callback")
            out.append(cb)
        return out

    def run(self, callbacks: Sequence[Callback] = (), overwrite: bool = False, resume: bool = False,
            rebuild_results: bool = False) -> RunSummary:
        """Train every global round; returns the :class:`RunSummary` on every rank.  Collective.

        ``overwrite`` replaces an existing output (and its checkpoint);
        ``resume`` continues the interrupted run in ``output.path`` from its
        checkpoint, bit for bit, on any number of ranks; with
        ``rebuild_results`` too, a missing or unreadable results file is written
        anew from the checkpoint (the damaged one is kept as ``<output>.damaged``).
        Raises :class:`RunError` (the same on every rank) when the run cannot
        start or a write or callback fails.  An unexpected error inside a round
        on a communicator of several ranks ends the job (``MPI_Abort``, exit 1)
        after rank 0 has recorded it in the results file.
        """
        if self._ran:
            raise RuntimeError("Session.run() was called already: build a new Session for another run")
        self._ran = True
        try:
            return self._run(list(callbacks), overwrite, resume, rebuild_results)
        except RunError:
            raise
        except Exception as e:
            if self.size > 1:  # the other ranks may wait in a collective: end the whole job
                log.critical("rank %d failed, aborting the job:\n%s", self.rank, traceback.format_exc())
                if self.rank != 0 and self.watchdog is not None and not isinstance(e, PeerFailed):
                    # rank 0 records the failure in the results file and ends the job; if it does not
                    # respond, this rank ends it after a while
                    self.watchdog.notify_failure(f"rank {self.rank} failed: {type(e).__name__}: {e}")
                self._lock.release()
                logging.shutdown()
                self.comm.Abort(EXIT_ABORT)
            raise
        finally:
            self._lock.release()
            self.close()

    def close(self) -> None:
        """Free the communicators (done by :meth:`run`)."""
        for lc in self._comms:
            if lc is not None:
                lc.free()
        self._comms = []
        if self.watchdog is not None:
            self.watchdog.free()
            self.watchdog = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _first_checks(self, overwrite: bool, resume: bool, rebuild: bool) -> Start:
        """On rank 0: take the output's lock, check the output (and checkpoint) and the free space."""
        cfg = self.config
        if self._lock.path.exists():  # a holder to name (or a stale lock to explain) comes first
            self._lock.acquire(take_over_stale=resume or overwrite)
        try:
            start = preflight(cfg, overwrite, resume, rebuild)  # also says what is wrong with the output's location
            if not self._lock.held:
                self._lock.acquire(take_over_stale=resume or overwrite)
            D, C = self.tree.num_devices, max(self.data.num_classes, 1)
            needed = (RESERVE_BYTES + checkpoint_bytes(self.num_params, self.aggregator.state_vectors(),
                                                       cfg.to_yaml(), self.rounds)
                      + 4 * self.num_params + (2 + start.rounds_done) * APPEND_BYTES
                      + (8 * D * (C + 4) if start.rebuild or not start.rounds_done else 0))
            out = Path(cfg.output.path)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                require_space(out.parent, needed, "this run's results file, checkpoint and final model")
            except OSError as e:
                raise OSError(f"cannot start the run in {str(out.parent)!r}: {e.strerror or e}. Free disk space "
                              "there or choose another output.path; nothing was written") from None
        except BaseException:
            self._lock.release()
            raise
        return start

    def _start(self, overwrite: bool, resume: bool, rebuild: bool) -> Start:
        start: Start = self._agree(lambda: self._first_checks(overwrite, resume, rebuild) if self.rank == 0
                                   else Start(), (RunError, CheckpointError, OSError), stage="checking the output")
        done = int(sum_over_ranks(self.comm, np.array([start.rounds_done]))[0])
        if not done:
            return Start()
        if self.rank == 0 and start.model is not None and start.model.size != self.num_params:
            problem = (f"the checkpoint's model has {start.model.size} parameters but the configured model "
                       f"has {self.num_params}")
        else:
            problem = None
        self._raise_agreed(f"{EXIT_USAGE}|{problem}" if problem else None)
        model = broadcast_vector(self.comm, start.model if self.rank == 0 else None, self.num_params)
        state = self._scatter_state(start.state or {})
        self._agree(lambda: self.aggregator.load_state(state), (ValueError,), stage="loading the checkpoint's state")
        return Start(done, model, start.state, start.metrics, start.rebuild)

    def _state_problem(self, state: dict[str, np.ndarray]) -> str | None:
        """On rank 0: what is wrong with a checkpoint's per-node state for this run, if anything."""
        for name, arr in state.items():
            try:
                self.aggregator.owner(name)
            except (ValueError, IndexError):
                return f"the checkpoint's state {name!r} is of no known kind (server.<n>.<u>.<name>, residual.<n>.<c>)"
            if np.asarray(arr).size != self.num_params:
                return (f"the checkpoint's state {name!r} has {np.asarray(arr).size} values but the model "
                        f"{self.num_params}")
        return None

    def _scatter_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rank 0's checkpointed per-node state, each entry to the rank that keeps it now.  Collective."""
        problem = self._state_problem(state) if self.rank == 0 else None
        self._raise_agreed(f"{EXIT_USAGE}|{problem}" if problem else None)
        per_rank: list[dict[str, np.ndarray]] | None = None
        if self.rank == 0:
            per_rank = [{} for _ in range(self.size)]
            for name, arr in state.items():
                per_rank[self.aggregator.owner(name)][name] = np.asarray(arr).reshape(-1)
        return scatter_named_vectors(self.comm, per_rank, self.num_params)

    def _gathered_state(self) -> dict[str, np.ndarray] | None:
        """Every rank's per-node state (server optimisers, residuals) on rank 0.  Collective."""
        return gather_named_vectors(self.comm, self.aggregator.state(), self.num_params)

    def _attrs(self) -> dict[str, Any]:
        return {
            "config_yaml": self.config.to_yaml(), "version": __version__,
            "mpi_library": MPI.Get_library_version().strip(), "world_size": self.size,
            "torch_version": torch.__version__, "numpy_version": np.__version__,
            "num_params": self.num_params, "N": self.tree.N,
            "threads_per_rank": threads_per_rank(self.config.train.threads),
            "train_device": str(self.device), "aggregation": self.vectors.name,
        }

    def _open_results(self, results: ResultsFile, overwrite: bool, start: Start) -> None:
        cfg, tree, data = self.config, self.tree, self.data
        class_counts = np.zeros((tree.num_devices, max(data.num_classes, 1)))
        for k, (_, y) in data.train.items():
            labels = y.cpu().numpy() if not y.is_floating_point() else np.zeros(len(y), dtype=np.int64)
            class_counts[k] = np.bincount(labels, minlength=class_counts.shape[1])
        class_counts = sum_over_ranks(self.comm, class_counts).astype(np.int64)
        topo = {f"starts_{n}": tree.starts[n] for n in range(tree.N + 1)}
        topo.update(rank_blocks=self.layout.bounds, samples=data.samples, class_counts=class_counts)
        quant = {
            "levels": np.array(cfg.quantizer.levels, dtype=np.int64),
            "bucket": np.array(-1 if cfg.quantizer.bucket == "tensor" else cfg.quantizer.bucket, dtype=np.int64),
            "error_feedback": np.array(self.aggregator.error_feedback, dtype=bool),
            "downlink": np.array([c.name if c is not None else "none" for c in self.aggregator.downlink], dtype=object),
            "downlink_bytes": np.array(self.aggregator.down_len, dtype=np.int64),
            "biased": np.array([bool(getattr(c, "biased", False)) for c in self.codecs], dtype=bool),
            "expected_messages_per_round": np.array([expected_messages(tree, cfg.tau, n, self.aggregator.participation)
                                                     for n in range(1, tree.N + 1)], dtype=np.float64),
            "kind": np.array([c.name for c in self.codecs], dtype=object),
            "message_bytes": np.array([c.nbytes(self.num_params) for c in self.codecs], dtype=np.int64),
            "messages_per_round": np.array([messages_per_round(tree, cfg.tau, n) for n in range(1, tree.N + 1)],
                                           dtype=np.int64),
            "q": np.array([c.variance(self.num_params) for c in self.codecs], dtype=np.float64),
        }
        self._agree(lambda: results.open(overwrite=overwrite, start=self.start_round, attrs=self._attrs(),
                                         topology=topo, quantizer=quant, num_links=tree.N,
                                         initial=self.initial_vector if cfg.model.init == "module" else None,
                                         metrics=start.metrics, rebuild=start.rebuild)
                    if self.rank == 0 else None,
                    (OSError,), EXIT_IO, stage="opening the results file")

    def _round(self, t: int, w: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """One global round and its record (the same on every rank).  Collective."""
        cfg, comm, guard = self.config, self.comm, self.watchdog
        if guard is not None:
            guard.start(t, first=t == self.start_round)
        t0 = time.perf_counter()
        w = self.aggregator.global_round(t, w)
        t_round = time.perf_counter() - t0
        st = self.aggregator.stats
        D, N = self.tree.num_devices, self.tree.N  # per-device entries come from one rank each: sums are exact
        totals = sum_over_ranks(comm, np.concatenate([st.loss, st.steps, st.uplink_bytes, st.messages,
                                                      st.downlink_bytes]), guard)
        peaks = max_over_ranks(comm, np.array([st.t_compute, st.t_codec, st.t_comm, t_round]), guard)
        evaluate = (t + 1) % cfg.train.eval_every == 0 or t == self.rounds - 1
        acc, test_loss, t_eval = float("nan"), float("nan"), 0.0
        if evaluate:
            t1 = time.perf_counter()
            d = self.data
            ev = self.trainer.evaluate(w, d.test_x, d.test_y, d.test_chunks, d.num_test_chunks)
            ev = sum_over_ranks(comm, ev, guard).sum(axis=0)  # in chunk order: the same for any rank count
            t_eval = float(max_over_ranks(comm, np.array([time.perf_counter() - t1]), guard)[0])
            test_loss = ev[0] / max(ev[2], 1)
            acc = ev[1] / max(ev[2], 1) if d.num_classes > 1 else float("nan")  # nan: regression
        record = {
            "round": t, "test_accuracy": acc, "test_loss": test_loss,
            "train_loss": totals[:D].sum() / max(totals[D : 2 * D].sum(), 1),
            "uplink_bytes": totals[2 * D : 2 * D + N].astype(np.int64),
            "messages": totals[2 * D + N : 2 * D + 2 * N].astype(np.int64),
            "downlink_bytes": totals[2 * D + 2 * N :].astype(np.int64),
            "time_compute": peaks[0], "time_codec": peaks[1], "time_comm": peaks[2],
            "time_round": peaks[3], "time_eval": t_eval, "modelled_time": self.modelled_round_time,
        }
        return w, record

    @staticmethod
    def _checkpoint(ckpt: Checkpointer, results: ResultsFile, w: np.ndarray, done: int,
                    state: dict[str, np.ndarray] | None) -> None:
        """On rank 0: the checkpoint after ``done`` rounds, with the metric rows so far."""
        ckpt.write(w, done, state, results.history())

    def _end_guard(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    def _timed_out(self, e: RoundTimeout, results: ResultsFile, ckpt: Checkpointer, w: np.ndarray, done: int
                   ) -> None:
        """A round exceeded ``train.round_timeout``: keep what can be kept, say what happened, end the job
        (``MPI_Abort`` with :data:`EXIT_TIMEOUT`, which also ends the ranks that stopped).  Not collective."""
        self._end_guard()
        speaker = self.rank == 0 or 0 in e.silent
        kept = ""
        if self.rank == 0:
            if self.aggregator.state_vectors() == 0 and done > self.start_round:
                try:  # the cloud model after the last finished round is the whole state: checkpoint it
                    ckpt.write(w, done, {}, results.history())
                    kept = f" Checkpoint {str(ckpt.path)!r} holds {done} rounds."
                except OSError as err:
                    kept = f" Writing the checkpoint failed too: {err}."
            else:
                kept = (" The per-node state of other ranks cannot be collected now: the last regular checkpoint "
                        f"{str(ckpt.path)!r} is kept." if self.aggregator.state_vectors() else "")
            results.close("failed", e.message + kept)
            self._lock.release()
        if speaker:
            log.critical("%s%s", e.message, kept)
            logging.shutdown()
        else:  # rank 0 speaks and ends the job; abort from here only if it never does
            time.sleep(30)
        self.comm.Abort(EXIT_TIMEOUT)

    def _run(self, callbacks: list[Callback], overwrite: bool, resume: bool, rebuild: bool) -> RunSummary:
        cfg, rank = self.config, self.rank
        start = self._start(overwrite, resume, rebuild)  # rank 0 holds the output's lock from here on
        self.start_round = start.rounds_done
        w = start.model if start.model is not None else self.initial_vector
        self.model_vector, self.round = w, self.start_round - 1
        if self.rank == 0:
            log.info("tree %s on %d ranks; devices per rank %s; load imbalance %.2f%s", self.tree.describe(),
                     self.size, np.diff(self.layout.bounds).tolist()[:16], self.layout.load_imbalance(),
                     f"; resuming after round {self.start_round - 1}" if self.start_round else "")
            for warning in edge.error_feedback_warnings(self.link_options.error_feedback, self.codecs,
                                                        self.num_params):
                log.warning("%s", warning)
            if self.vectors.name != "host":
                slow = self.aggregator.links_through_host()
                log.info("aggregation on %s%s", self.vectors.name,
                         f"; through the host (no device form, d floats per message): {', '.join(slow)}" if slow else
                         ": only packed messages reach the host")
        results = ResultsFile(cfg.output.path)
        ckpt = Checkpointer(cfg.output.path, cfg.output.checkpoint_every, cfg.to_yaml())
        status, message, done, acc = "completed", "", self.start_round, float("nan")
        try:  # from here on, rank 0 records any failure in the results file (or removes a file with no round)
            callbacks = self._agree(self.config_callbacks, (PluginError, RunError),
                                    stage="building the config's callbacks") + callbacks
            self._open_results(results, overwrite, start)
            self._hooks(callbacks, "on_run_start")
            for t in range(self.start_round, self.rounds):
                w, record = self._round(t, w)
                self.model_vector, self.round, done = w, t, t + 1
                if np.isfinite(record["test_accuracy"]):
                    acc = float(record["test_accuracy"])
                self._on_rank0(f"writing round {t} to the results file", results.append, record)
                diverged = not (math.isfinite(record["train_loss"]) and np.isfinite(w).all())
                stop = self._hooks(callbacks, "on_round_end", record)
                self._end_guard()
                if diverged:
                    status = "diverged"
                    message = (f"training diverged in round {t} (train loss {record['train_loss']}, model finite: "
                               f"{bool(np.isfinite(w).all())}); lower the learning rate, e.g. "
                               f"--set train.lr={cfg.train.lr / 4:g} (now {cfg.train.lr:g})")
                    break
                if ckpt.due(done, self.rounds, stop):
                    self._on_rank0("writing the checkpoint", self._checkpoint, ckpt, results, w, done,
                                   self._gathered_state())
                if stop and done < self.rounds:
                    status = "preempted"
                    message = (f"stopped after round {t} at the request of a signal or callback; checkpoint "
                               f"{str(ckpt.path)!r} holds {done} rounds. Continue with: qmlhfl-mpi run CONFIG "
                               "--resume")
                    break
            if status != "preempted":  # completed, or diverged: the file keeps the model it ended with
                self._on_rank0("writing the final model", results.final, w)
                self._on_rank0("removing the checkpoint", ckpt.remove)
        except RoundTimeout as e:
            status, message = "failed", e.message
            self._timed_out(e, results, ckpt, w, done)  # does not return
        except BaseException as e:
            if status in ("completed", "preempted"):
                status = "failed"
                message = str(e) if isinstance(e, (PeerFailed, RunError)) else f"{type(e).__name__}: {e}"
            raise
        finally:
            if rank == 0:
                results.close(status, message)
                if status == "failed":
                    self._lock.release()
            if status == "failed":  # best effort, not collective: let callbacks release what they hold
                for cb in callbacks:
                    try:
                        cb.on_run_end(self, RunSummary(status, done, acc, cfg.output.path, message))
                    except Exception:  # noqa: BLE001 - already failing
                        log.debug("on_run_end of %s failed after a failed run", type(cb).__name__, exc_info=True)
        summary = RunSummary(status, done, acc, cfg.output.path, message)
        self._hooks(callbacks, "on_run_end", summary)
        return summary
