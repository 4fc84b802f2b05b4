"""The composition root: a :class:`Runtime` is everything a run is made of, built once from the config and a
communicator.  It is the only caller of the builders (:mod:`qmlhfl_mpi.config.build`); every part receives
the typed pieces it needs, never the config.  :meth:`Runtime.build` is collective and agrees on every error
(:class:`~.agreement.Agreement`), so a run that cannot be built stops on every rank with one message.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..comm.collectives import broadcast_vector, max_over_ranks, sum_over_ranks
from ..comm.communicators import Intracomm, LayerComms, build_layer_comms
from ..comm.executor import RoundExecutor
from ..comm.placement import PlacementError, mpi_library, ranks_on_node, select_device
from ..comm.watchdog import Watchdog
from ..config import Config, ConfigError
from ..config import build as builders
from ..config.sizing import check_memory, recheck_memory
from ..core.admm import Admm
from ..core.clients import Clients
from ..core.codecs import Codec
from ..core.links import Link
from ..core.memory import MemoryEstimateError
from ..core.participation import Participation, expected_messages
from ..core.plan import Planner
from ..core.privacy import Accountant
from ..core.registry import PluginError
from ..core.scheduler import RoundScheduler
from ..core.system import TraceError
from ..core.theory import round_time
from ..core.topology import RankLayout, TopologyError, Tree, messages_per_round
from ..core.vectors import Vectors
from ..data.local import LocalData
from ..data.source import DataError
from ..learning.clients import Batched, OneByOne
from ..learning.train import LocalTrainer
from ..learning.vectorized import use_vectorized
from .agreement import Agreement

__all__ = ["Runtime", "threads_per_rank"]


def threads_per_rank(threads: int) -> int:
    """``train.threads``, else ``SLURM_CPUS_PER_TASK``, else 1."""
    if threads:
        return threads
    try:
        return max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True, eq=False)
class Runtime:
    """A run's parts on one rank (see the module doc).  ``comms`` and ``watchdog`` hold MPI communicators:
    :meth:`close` frees them."""

    config: Config
    comm: Intracomm
    rank: int
    size: int
    tree: Tree
    layout: RankLayout
    devices: range                # this rank's devices
    data: LocalData
    device: torch.device          # where this rank trains
    model: nn.Module
    trainer: LocalTrainer
    clients: Clients
    vectorized: bool              # devices of one edge trained together
    links: tuple[Link, ...]       # per link, cloud last
    participation: Participation
    planner: Planner
    vectors: Vectors              # the aggregation's vector backend
    comms: list[LayerComms | None]
    watchdog: Watchdog | None     # failure notices and the round deadline (None on one rank without a deadline)
    executor: RoundExecutor
    scheduler: RoundScheduler     # the round plans against the virtual clock (docs/system.md)
    num_params: int
    initial_vector: np.ndarray    # the cloud model before the first round
    modelled_round_time: float    # the closed-form round time of docs/theory.md
    accountant: Accountant | None = None  # privacy's epsilon after each round (docs/privacy.md)

    @property
    def codecs(self) -> list[Codec]:
        """The uplink codec of every link."""
        return [lk.codec for lk in self.links]

    @classmethod
    def build(cls, cfg: Config, comm: Intracomm, agreement: Agreement) -> Runtime:
        """Build every part from ``cfg`` on ``comm``, each step agreed on by all ranks.  Collective."""
        step = agreement.step
        rank, size = comm.Get_rank(), comm.Get_size()
        local_ranks = ranks_on_node(comm)
        sized = step(lambda: check_memory(cfg, size, local_ranks), (MemoryEstimateError,),
                     stage="estimating the memory per rank")
        tree = step(cfg.build_tree, (TopologyError, ValueError), stage="building the tree")
        layout = step(lambda: RankLayout.build(tree, size), (TopologyError,), stage="placing devices on ranks")
        busiest = int(np.diff(layout.bounds).max())
        step(lambda: recheck_memory(sized, busiest, local_ranks, cfg.train.memory_limit_gb), (MemoryEstimateError,),
             stage="estimating the memory per rank")
        devices = layout.devices(rank)
        torch.set_num_threads(threads_per_rank(cfg.train.threads))
        data = step(lambda: builders.local_data(cfg, tree, devices, rank, size, all_samples=size == 1),
                    (DataError, ValueError, OSError), stage="loading the data")
        if not data.samples_complete:  # each rank counted its own devices' samples: add them up
            data.samples = sum_over_ranks(comm, data.samples.astype(np.float64)).astype(np.int64)
            data.samples_complete = True
        device = step(lambda: select_device(comm, cfg.train.device, cfg.train.share_gpus), (PlacementError,),
                      stage="choosing the training device")
        if device.type != "cpu":
            data.to(device)
        model = step(lambda: builders.model(cfg, data.input_shape, data.num_classes), (PluginError, ValueError),
                     stage="building the model")
        sizes = tuple(p.numel() for p in model.parameters())
        links = step(lambda: builders.links(cfg, sizes), (PluginError, ValueError), stage="building the links")
        private = step(lambda: builders.privacy(cfg, tree, sum(sizes), [lk.codec for lk in links],
                                                check_target=rank == 0), (ConfigError,),
                       stage="building the privacy mechanism")
        trainer = step(lambda: LocalTrainer(model, cfg.train.lr, cfg.train.batch_size, cfg.train.seed, device,
                                            opt=builders.client_optimizer(cfg), schedule=builders.lr_schedule(cfg)),
                       (ValueError,), stage="building the trainer")
        dim = trainer.dim
        initial = trainer.get_vector()
        if cfg.model.init == "module":  # the factory's own init: rank 0's model for everyone
            initial = broadcast_vector(comm, initial if rank == 0 else None, dim)
        vectorized = cfg.admm.layer == 0 and step(lambda: use_vectorized(cfg.train.vectorize, model, dim),
                                                  (ValueError,), stage="choosing the batched trainer")
        clients: Clients = (Batched if vectorized else OneByOne)(trainer, data.train, cfg.tau[0])
        participation = builders.participation(cfg)
        samples = data.samples if cfg.topology.weighting == "samples" else None
        planner = step(lambda: Planner(tree, cfg.tau, participation, cfg.train.seed, samples), (ValueError,),
                       stage="planning the rounds")
        vectors = step(lambda: builders.vectors(cfg.train.aggregate_on, device), (ValueError,),
                       stage="choosing the aggregation's vectors")
        comms = build_layer_comms(comm, layout)
        watchdog = Watchdog(comm, cfg.train.round_timeout) if size > 1 or cfg.train.round_timeout > 0 else None
        try:
            executor = step(lambda: RoundExecutor(layout, rank, comms, links, dim, clients, vectors, watchdog,
                                                  world=comm, privacy=private[0] if private else None,
                                                  secure=cfg.privacy.secure_aggregation,
                                                  admm=Admm(cfg.admm.rho, cfg.admm.layer) if cfg.admm.layer else None),
                            (ValueError,), stage="building the executor")
        except BaseException:
            _free(comms, watchdog)
            raise
        agreement.guard = watchdog
        try:
            scheduler = step(lambda: _scheduler(cfg, tree, planner, executor), (TraceError, ConfigError, PluginError,
                                                                                  ValueError, TypeError),
                             stage="building the system model")
        except BaseException:
            _free(comms, watchdog)
            raise
        return cls(cfg, comm, rank, size, tree, layout, devices, data, device, model, trainer, clients, vectorized,
                   links, participation, planner, vectors, comms, watchdog, executor, scheduler, dim, initial,
                   round_time(dim, cfg.tau, [lk.codec for lk in links], tree, builders.latency(cfg)),
                   private[1] if private else None)

    def evaluate(self, w: np.ndarray, guard: Watchdog | None = None) -> tuple[float, float, float]:
        """(test accuracy, test loss, seconds) of the cloud model ``w`` on the test set: each rank scores its
        test chunks, and the sums are reduced in chunk order, so the figures are the same for any rank count.
        The accuracy is NaN for regression targets.  Collective."""
        t0, d = time.perf_counter(), self.data
        ev = self.trainer.evaluate(w, d.test_x, d.test_y, d.test_chunks, d.num_test_chunks)
        ev = sum_over_ranks(self.comm, ev, guard).sum(axis=0)
        secs = float(max_over_ranks(self.comm, np.array([time.perf_counter() - t0]), guard)[0])
        acc = ev[1] / max(ev[2], 1) if d.num_classes > 1 else float("nan")
        return float(acc), float(ev[0] / max(ev[2], 1)), secs

    def close(self) -> None:
        """Free the communicators (idempotent)."""
        _free(self.comms, self.watchdog)
        self.comms.clear()

    def describe(self, start_round: int = 0) -> list[tuple[int, str]]:
        """What rank 0 logs when the run starts, as ``(logging level, line)``: the tree on the ranks, the
        error-feedback warnings, where the aggregation runs."""
        out = [(logging.INFO, f"tree {self.tree.describe()} on {self.size} ranks; devices per rank "
                              f"{np.diff(self.layout.bounds).tolist()[:16]}; load imbalance "
                              f"{self.layout.load_imbalance():.2f}"
                              + (f"; resuming after round {start_round - 1}" if start_round else ""))]
        out += [(logging.WARNING, w) for w in builders.error_feedback_warnings(
            tuple(lk.error_feedback for lk in self.links), self.codecs, self.num_params)]
        if self.vectors.name != "host":
            slow = self.executor.links_through_host()
            out.append((logging.INFO, f"aggregation on {self.vectors.name}" + (
                f"; through the host (no device form, d floats per message): {', '.join(slow)}" if slow else
                ": only packed messages reach the host")))
        return out

    # ---- what the results file records about the run ------------------------------
    def attributes(self) -> dict[str, Any]:
        """The results file's root attributes: the config, versions, sizes, where it ran."""
        return {
            "config_yaml": self.config.to_yaml(), "version": __version__,
            "mpi_library": mpi_library(), "world_size": self.size,
            "torch_version": torch.__version__, "numpy_version": np.__version__,
            "num_params": self.num_params, "N": self.tree.N,
            "threads_per_rank": threads_per_rank(self.config.train.threads),
            "train_device": str(self.device), "aggregation": self.vectors.name,
        }

    def new_class_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(devices, counts)``: training samples per class of this rank's devices whose counts became known since
        the last call (all hosted devices of a pooled data set at once; a generated one's as they are made)."""
        return self.data.train.take_counts()

    def topology(self, devices: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        """The results file's ``/topology``: node boundaries, rank blocks, and per device its samples and class
        counts (``counts`` of ``devices``, every rank's :meth:`new_class_counts`; -1 for the other devices)."""
        tree = self.tree
        topo = {f"starts_{n}": tree.starts[n] for n in range(tree.N + 1)}
        table = np.full((tree.num_devices, max(self.data.num_classes, 1)), -1, dtype=np.int64)
        table[devices] = counts
        topo.update(rank_blocks=self.layout.bounds, samples=self.data.samples, class_counts=table)
        return topo

    def quantizer(self) -> dict[str, np.ndarray]:
        """The results file's ``/quantizer``: every link's codecs, message sizes and counts."""
        cfg, tree, d, links = self.config, self.tree, self.num_params, self.links
        N = range(1, tree.N + 1)
        return {
            "levels": np.array(cfg.quantizer.levels, dtype=np.int64),
            "bucket": np.array(-1 if cfg.quantizer.bucket == "tensor" else cfg.quantizer.bucket, dtype=np.int64),
            "error_feedback": np.array([lk.error_feedback for lk in links], dtype=bool),
            "downlink": np.array([lk.downlink.name if lk.downlink is not None else "none" for lk in links],
                                 dtype=object),
            "downlink_bytes": np.array(self.executor.down_len, dtype=np.int64),
            "biased": np.array([bool(getattr(lk.codec, "biased", False)) for lk in links], dtype=bool),
            "expected_messages_per_round": np.array([expected_messages(tree, cfg.tau, n, self.participation)
                                                     for n in N], dtype=np.float64),
            "kind": np.array([lk.codec.name for lk in links], dtype=object),
            "message_bytes": np.array([lk.codec.nbytes(d) for lk in links], dtype=np.int64),
            "messages_per_round": np.array([messages_per_round(tree, cfg.tau, n) for n in N], dtype=np.int64),
            "q": np.array([lk.codec.variance(d) for lk in links], dtype=np.float64),
        }


def _scheduler(cfg: Config, tree: Tree, planner: Planner, executor: RoundExecutor) -> RoundScheduler:
    """The system model, the policies and the message sizes; refuses a ``deadline`` layer with
    ``min_children: 0`` that no child meets in the first round (its nodes would never aggregate)."""
    try:
        policies = builders.policies(cfg)
    except (PluginError, ValueError, TypeError) as e:
        raise ConfigError(f"config key 'aggregation.policy' = {list(cfg.aggregation.policy)}: {e}") from None
    scheduler = RoundScheduler(planner, builders.system(cfg, tree), policies,
                               tuple(8 * b for b in executor.msg_len), tuple(8 * b for b in executor.down_len),
                               builders.mobility(cfg, tree))
    m = scheduler.buffered
    if m is not None:  # per child of a buffered node, a message in flight and one buffered; the nodes' models
        held = executor.held
        held.slots = sum(2 * tree.num_nodes(n - 1) * held.parts(n) for n in range(m, tree.N + 1)) \
            + 2 * sum(tree.num_nodes(n) for n in range(m, tree.N))
    for n, earliest in scheduler.unmet_deadlines(scheduler.round(0)):
        raise ConfigError(
            f"config key 'aggregation.deadline' = {list(cfg.aggregation.deadline)}: no child of a layer-{n} node "
            f"meets its deadline of {cfg.aggregation.deadline[n - 1]:g} s in the first round (the earliest message "
            f"arrives {earliest:.4g} s after the model is sent) and aggregation.min_children is 0, so those nodes "
            f"would never aggregate; raise the deadline above {earliest:.4g} s or set min_children >= 1")
    return scheduler


def _free(comms: list[LayerComms | None], watchdog: Watchdog | None) -> None:
    for lc in comms:
        if lc is not None:
            lc.free()
    if watchdog is not None:
        watchdog.free()
