"""A training run on a communicator: :class:`Session` keeps the run's life (start or resume, the rounds, the
agreements, callbacks, stops and timeouts); its parts are a :class:`~.runtime.Runtime`, built once.

``Session(cfg, comm)`` builds the runtime; ``run(callbacks)`` trains the global rounds, with the HDF5 file
and the checkpoint as collaborators and everything optional (console table, CSV, TensorBoard, signals, the
user's own) as callbacks.  Both are collective over ``comm``.  Errors every rank can see coming are agreed on
(:class:`~.agreement.Agreement`): all ranks raise the same :class:`RunError`.  An unexpected exception inside
a round ends the job on a communicator of more than one rank, after rank 0 has recorded it.
"""
from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

from ..comm.collectives import gather_rows, max_over_ranks, sum_over_ranks
from ..comm.watchdog import PeerFailed, RoundTimeout
from ..config import Config
from ..core.exitcodes import EXIT_ABORT, EXIT_TIMEOUT
from ..core.registry import PluginError
from ..core.scheduler import changed_rows
from ..results import CheckpointError
from .agreement import Agreement
from .buffered import BufferedRounds
from .callbacks import Callback, RunSummary, configured_callbacks
from .clipping import ClipState
from .errors import RunError
from .lock import OutputLock
from .preflight import Start, claim_output, input_digests
from .recorder import Checkpointer, ResultsFile, start_bytes
from .runtime import Runtime, threads_per_rank
from .state import gather_state, resume_from

log = logging.getLogger(__name__)

__all__ = ["RunSummary", "Session", "threads_per_rank"]

# the runtime's parts a callback may read as session.<name>
_PARTS = frozenset({"rank", "size", "tree", "layout", "devices", "data", "device", "model", "trainer", "clients",
                    "vectorized", "links", "codecs", "participation", "planner", "vectors", "executor", "watchdog",
                    "scheduler", "num_params", "initial_vector", "modelled_round_time"})


class Session:
    """One run of ``cfg`` on ``comm`` (default ``MPI.COMM_WORLD``; any intracommunicator, ``COMM_SELF``
    included).  Construction is collective: it builds the :class:`~.runtime.Runtime` and raises
    :class:`RunError` on every rank if any rank cannot.

    Callbacks may read ``comm``, ``config``, ``runtime``, ``rounds``, ``start_round``, ``round`` (the last
    finished round, -1 before the first), ``model_vector`` (the cloud model after it), ``virtual_time`` (the
    virtual clock after it, seconds since the run started: docs/system.md) and the runtime's parts
    by name: ``rank``, ``size``, ``tree``, ``layout``, ``devices``, ``data``, ``device``, ``model``,
    ``trainer``, ``clients``, ``links``, ``codecs``, ``planner``, ``vectors``, ``executor``, ``num_params``, ...
    """

    def __init__(self, cfg: Config, comm: MPI.Intracomm | None = None) -> None:
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.config, self.rounds = cfg, cfg.train.rounds
        self.agreement = Agreement(self.comm)
        self.runtime = Runtime.build(cfg, self.comm, self.agreement)
        self.start_round, self.round = 0, -1
        self.virtual_time = 0.0  # seconds of the virtual clock at the end of the last finished round
        self.model_vector = self.runtime.initial_vector
        self._ran = False
        self._edges: np.ndarray | None = None    # rank 0, a dynamic tree: every device's edge in the last round
        self._moved = np.zeros((0, 3), dtype=np.int64)  # rank 0: the last round's /topology/parents rows
        self._async: BufferedRounds | None = None  # buffered layers: the rounds of events
        self._epsilons: np.ndarray | None = None  # privacy: epsilon after rounds 1, 2, ... (set by run)
        self._clip = ClipState(self.runtime.executor, self.comm, self.runtime.watchdog)  # privacy's clip per round
        self._lock = OutputLock(cfg.output.path)

    def __getattr__(self, name: str) -> Any:
        if name in _PARTS:
            return getattr(self.runtime, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def close(self) -> None:
        """Free the communicators (done by :meth:`run`)."""
        self.runtime.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def config_callbacks(self) -> list[Callback]:
        """The callbacks the config asks for (:func:`~.callbacks.configured_callbacks`)."""
        return configured_callbacks(self.config)

    def run(self, callbacks: Sequence[Callback] = (), overwrite: bool = False, resume: bool = False,
            rebuild_results: bool = False) -> RunSummary:
        """Train every global round; returns the :class:`RunSummary` on every rank.  Collective.

        ``overwrite`` replaces an existing output (and its checkpoint); ``resume`` continues the interrupted
        run in ``output.path`` from its checkpoint, bit for bit, on any number of ranks; with
        ``rebuild_results`` too, a missing or unreadable results file is written anew from the checkpoint
        (the damaged one is kept as ``<output>.damaged``).  Raises :class:`RunError` (the same on every rank)
        when the run cannot start or a write or callback fails.  An unexpected error inside a round on a
        communicator of several ranks ends the job (``MPI_Abort``, exit 1) after rank 0 has recorded it.
        """
        if self._ran:
            raise RuntimeError("Session.run() was called already: build a new Session for another run")
        self._ran = True
        try:
            return self._run(list(callbacks), overwrite, resume, rebuild_results)
        except RunError:
            raise
        except Exception as e:
            if self.runtime.size > 1:  # the other ranks may wait in a collective: end the whole job
                log.critical("rank %d failed, aborting the job:\n%s", self.runtime.rank, traceback.format_exc())
                wd = self.runtime.watchdog
                if self.runtime.rank != 0 and wd is not None and not isinstance(e, PeerFailed):
                    # rank 0 records the failure and ends the job; if it does not respond, this rank does
                    wd.notify_failure(f"rank {self.runtime.rank} failed: {type(e).__name__}: {e}")
                self._lock.release()
                logging.shutdown()
                self.comm.Abort(EXIT_ABORT)
            raise
        finally:
            self._lock.release()
            self.close()

    def _start(self, overwrite: bool, resume: bool, rebuild: bool) -> Start:
        """Claim the output on rank 0 and, when resuming, hand every rank its share of the checkpoint."""
        rt, cfg = self.runtime, self.config

        def needed(s: Start) -> int:
            return start_bytes(rt.num_params, rt.executor.state_vectors(), cfg.to_yaml(), self.rounds,
                               s.rounds_done, rt.tree.num_devices, rt.data.num_classes,
                               fresh_file=s.rebuild or not s.rounds_done)

        start: Start = self.agreement.step(
            lambda: claim_output(cfg, self._lock, overwrite, resume, rebuild, needed) if rt.rank == 0 else Start(),
            (RunError, CheckpointError, OSError), stage="checking the output")
        start = resume_from(self.comm, self.agreement, rt.executor, start, rt.num_params)
        self.virtual_time = self._virtual_time_after(start) if start.rounds_done else 0.0
        return start

    def _virtual_time_after(self, start: Start) -> float:
        """The virtual clock after the checkpoint's rounds: rank 0's recorded value for every rank, or (a
        checkpoint without it) the clock of those rounds computed again.  Collective."""
        rt, done, t0 = self.runtime, start.rounds_done, math.nan
        m = start.metrics if rt.rank == 0 else None
        if m is not None and "virtual_time" in m and len(m["virtual_time"]) >= done:
            t0 = float(m["virtual_time"][done - 1])
        t0 = float(sum_over_ranks(self.comm, np.array([t0 if rt.rank == 0 else 0.0]))[0])
        return t0 if math.isfinite(t0) else rt.scheduler.start_of(done)

    def _round(self, t: int, w: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """One global round and its record (the same on every rank).  Collective."""
        rt, comm, guard = self.runtime, self.comm, self.runtime.watchdog
        if guard is not None:
            guard.start(t, first=t == self.start_round)
        t0 = time.perf_counter()
        timed = None
        if rt.scheduler.buffered is not None:
            if self._async is None:
                self._async = BufferedRounds(rt.scheduler, rt.executor, self.agreement, t, w)
            w, clock, extra_m, extra_d, end = self._async.round(w)
            clock.update({"clip": math.nan, "unclipped_fraction": math.nan})  # (privacy refuses buffered layers)
        else:
            timed = rt.scheduler.round(t, self.virtual_time)
            w = rt.executor.run(timed.plan, w)
            clock, extra_m, extra_d = timed.record(self.virtual_time), timed.extra_messages, timed.extra_downlinks
            clock.update(self._clip.after_round(timed.plan))
            end = self.virtual_time + timed.duration
        totals = rt.executor.stats.reduce(lambda x: sum_over_ranks(comm, x, guard),
                                          lambda x: max_over_ranks(comm, x, guard), time.perf_counter() - t0)
        evaluate = (t + 1) % self.config.train.eval_every == 0 or t in (self.rounds - 1, self._budget_rounds() - 1)
        acc, test_loss, t_eval = rt.evaluate(w, guard) if evaluate else (float("nan"), float("nan"), 0.0)
        record = {"round": t, "test_accuracy": acc, "test_loss": test_loss, **totals.as_record(),
                  "time_eval": t_eval, "modelled_time": rt.modelled_round_time, **clock,
                  "epsilon": float(self._epsilons[t]) if self._epsilons is not None else float("nan")}
        # what was sent but not aggregated (dropped children, their subtrees) crossed the wire too
        ex = rt.executor
        record["messages"] = totals.messages + extra_m
        record["uplink_bytes"] = totals.uplink_bytes + extra_m * np.array(ex.msg_len)
        record["downlink_bytes"] = totals.downlink_bytes + extra_d * np.array(ex.down_len)
        self.virtual_time = end
        if self._edges is not None and timed is not None:  # rank 0 records the devices whose edge changed
            now = rt.scheduler.edges(timed)
            self._moved, self._edges = changed_rows(self._edges, now, t), now
        return w, record

    def _privacy_epsilons(self) -> np.ndarray | None:
        """Epsilon after rounds 1 .. train.rounds + 1 (docs/privacy.md): rank 0's accountant for every rank
        (only it imports the accountant).  Collective."""
        acc = self.runtime.accountant
        if acc is None:
            return None
        T = self.rounds + 1
        eps = self.agreement.step(lambda: acc.epsilons(T) if self.runtime.rank == 0 else np.zeros(T), (ValueError,),
                                  stage="computing the privacy accountant's epsilons")
        return sum_over_ranks(self.comm, eps)

    def _budget_rounds(self) -> int:
        """How many rounds ``privacy.target_epsilon`` allows (``train.rounds`` without a budget)."""
        target = self.config.privacy.target_epsilon
        if self._epsilons is None or not target:
            return self.rounds
        return min(self.rounds, int(np.sum(self._epsilons <= target)))

    def _budget_message(self, done: int) -> str:
        acc, eps = self.runtime.accountant, self._epsilons
        assert acc is not None and eps is not None
        p = self.config.privacy
        spent = f"epsilon = {eps[done - 1]:.4g}" if done else "nothing"
        return (f"stopped at the privacy budget after {done} rounds: {spent} at delta = {acc.delta:.3g} "
                f"(privacy.target_epsilon = {p.target_epsilon:g}); round {done} would spend {eps[done]:.4g}. The "
                f"final model is the model after those rounds; the checkpoint is kept: raise "
                "privacy.target_epsilon and run with --resume to continue")

    def _parents_so_far(self) -> np.ndarray | None:
        """Rank 0: the ``/topology/parents`` rows of the rounds before the start (timed again), and from here on
        it tracks every device's edge; ``None`` when the tree never changes."""
        sched = self.runtime.scheduler
        if not sched.dynamic:
            return None
        rows, self._edges = sched.parent_changes(self.start_round)
        return rows

    def _record_class_counts(self, results: ResultsFile) -> None:
        """The class counts of the devices made since the last time, into the results file.  Collective."""
        got = gather_rows(self.comm, *self.agreement.step(self.runtime.new_class_counts, (),
                                                          stage="counting the devices' classes"))
        self.agreement.on_rank0("writing the class counts", lambda: results.class_counts(*got) if got else None)

    def _end_guard(self) -> None:
        if self.runtime.watchdog is not None:
            self.runtime.watchdog.stop()

    def _timed_out(self, e: RoundTimeout, results: ResultsFile, ckpt: Checkpointer, w: np.ndarray, done: int
                   ) -> None:
        """A round exceeded ``train.round_timeout``: keep what can be kept, say what happened, end the job
        (``MPI_Abort`` with :data:`EXIT_TIMEOUT`, which also ends the ranks that stopped).  Not collective."""
        self._end_guard()
        rank, stateful = self.runtime.rank, self.runtime.executor.state_vectors()
        kept = ""
        if rank == 0:
            if stateful == 0 and done > self.start_round:
                try:  # the cloud model after the last finished round is the whole state: checkpoint it
                    ckpt.write(w, done, {}, results)
                    kept = f" Checkpoint {str(ckpt.path)!r} holds {done} rounds."
                except OSError as err:
                    kept = f" Writing the checkpoint failed too: {err}."
            elif stateful:
                kept = (" The per-node state of other ranks cannot be collected now: the last regular checkpoint "
                        f"{str(ckpt.path)!r} is kept.")
            results.close("failed", e.message + kept)
            self._lock.release()
        if rank == 0 or 0 in e.silent:
            log.critical("%s%s", e.message, kept)
            logging.shutdown()
        else:  # rank 0 speaks and ends the job; abort from here only if it never does
            time.sleep(30)
        self.comm.Abort(EXIT_TIMEOUT)

    def _run(self, callbacks: list[Callback], overwrite: bool, resume: bool, rebuild: bool) -> RunSummary:
        cfg, rt, agreement = self.config, self.runtime, self.agreement
        start = self._start(overwrite, resume, rebuild)  # rank 0 holds the output's lock from here on
        self.start_round = start.rounds_done
        w = start.model if start.model is not None else rt.initial_vector
        self.model_vector, self.round = w, self.start_round - 1
        if rt.rank == 0:
            for level, line in rt.describe(self.start_round):
                log.log(level, "%s", line)
        results = ResultsFile(cfg.output.path)
        ckpt = Checkpointer(cfg.output.path, cfg.output.checkpoint_every, cfg.to_yaml(),
                            inputs=agreement.step(lambda: input_digests(cfg) if rt.rank == 0 else "", (OSError,),
                                                  stage="reading the input files' digests"),
                            keep=cfg.output.keep_checkpoint)
        status, message, done, acc = "completed", "", self.start_round, float("nan")
        try:  # from here on, rank 0 records any failure in the results file (or removes a file with no round)
            callbacks = agreement.step(self.config_callbacks, (PluginError, RunError),
                                       stage="building the config's callbacks") + callbacks
            counts = gather_rows(self.comm, *agreement.step(rt.new_class_counts, (),
                                                            stage="counting the devices' classes"))
            agreement.on_rank0("opening the results file", lambda: results.open(
                overwrite=overwrite, start=self.start_round, attrs=rt.attributes(),
                topology=rt.topology(*counts) if counts is not None else {},
                quantizer=rt.quantizer(), num_links=rt.tree.N, metrics=start.metrics, rebuild=start.rebuild,
                initial=rt.initial_vector if cfg.model.init == "module" else None, parents=self._parents_so_far()))
            agreement.hooks(callbacks, "on_run_start", self)
            self._epsilons = self._privacy_epsilons()
            self._clip.resume(start.metrics if rt.rank == 0 else None, self.start_round)
            if self.start_round >= self._budget_rounds() and self.start_round < self.rounds:
                status, message = "budget_spent", self._budget_message(self.start_round)
            for t in range(self.start_round, self.rounds if status == "completed" else self.start_round):
                w, record = self._round(t, w)
                self.model_vector, self.round, done = w, t, t + 1
                if np.isfinite(record["test_accuracy"]):
                    acc = float(record["test_accuracy"])
                agreement.on_rank0(f"writing round {t} to the results file", results.append, record)
                if rt.scheduler.dynamic:  # (collective: every rank agrees; rank 0 holds the rows)
                    agreement.on_rank0(f"writing round {t}'s tree to the results file", results.parents, self._moved)
                diverged = not (math.isfinite(record["train_loss"]) and np.isfinite(w).all())
                stop = agreement.hooks(callbacks, "on_round_end", self, record)
                self._end_guard()
                if diverged:
                    status = "diverged"
                    message = (f"training diverged in round {t} (train loss {record['train_loss']}, model finite: "
                               f"{bool(np.isfinite(w).all())}); lower the learning rate, e.g. "
                               f"--set train.lr={cfg.train.lr / 4:g} (now {cfg.train.lr:g})")
                    break
                spent = done == self._budget_rounds() and done < self.rounds
                if ckpt.due(done, self.rounds, stop or spent):
                    self._record_class_counts(results)
                    state = gather_state(self.comm, rt.executor, rt.num_params)
                    agreement.on_rank0("writing the checkpoint", ckpt.write, w, done, state, results)
                if stop and done < self.rounds:
                    status = "preempted"
                    message = (f"stopped after round {t} at the request of a signal or callback; checkpoint "
                               f"{str(ckpt.path)!r} holds {done} rounds. Continue with: qmlhfl-mpi run CONFIG "
                               "--resume")
                    break
                if spent:
                    status, message = "budget_spent", self._budget_message(done)
                    break
            if status != "preempted":  # completed, diverged or at the budget: the file keeps the model it ended with
                self._record_class_counts(results)
                agreement.on_rank0("writing the final model", results.final, w)
                if status != "budget_spent" and not ckpt.keep:  # (kept: more rounds continue from it)
                    agreement.on_rank0("removing the checkpoint", ckpt.remove)
        except RoundTimeout as e:
            status, message = "failed", e.message
            self._timed_out(e, results, ckpt, w, done)  # does not return
        except BaseException as e:
            if status in ("completed", "preempted"):
                status = "failed"
                message = str(e) if isinstance(e, (PeerFailed, RunError)) else f"{type(e).__name__}: {e}"
            raise
        finally:
            if rt.rank == 0:
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
        agreement.hooks(callbacks, "on_run_end", self, summary)
        return summary
