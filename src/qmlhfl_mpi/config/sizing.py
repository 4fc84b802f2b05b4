"""The memory check's inputs: a run's :class:`~qmlhfl_mpi.core.memory.Sizing` from its config, and the memory a
rank has available on this node.  Not collective; the session agrees on the verdict.

Nothing large is built here: the tree is counted from its specification
(:class:`~qmlhfl_mpi.core.topology.TreeShape`), the data from the data set's
description (generated data sets' expected sizes, the built-in image sets'
known sizes, an ``arrow`` data set's row counts from its files' metadata),
and the model once (its parameters).  A plug-in pooled data
set's training split cannot be sized before it is loaded: its test split is,
and a note says so.
"""
from __future__ import annotations

import math
import os
import resource
from dataclasses import replace
from pathlib import Path

from ..core.memory import MemoryEstimate, MemoryEstimateError, Sizing, estimate_memory, fits
from ..core.registry import PluginError
from ..core.server_opt import make_server_optimizer
from ..core.topology import TreeShape
from ..data.arrow import arrow, arrow_sizes
from ..data.registry import POOLED_SIZES
from ..learning.models import num_parameters
from ..learning.vectorized import CHUNK, use_vectorized
from . import build as builders
from .schema import Config

__all__ = ["available_memory", "cgroup_room", "check_memory", "memory_estimate", "recheck_memory", "sizing"]

GiB = 1 << 30


def _model_params(cfg: Config, shape: tuple[int, ...], classes: int) -> tuple[int, bool]:
    """(parameters, trained in batches) of the configured model."""
    model = builders.model(cfg, shape, classes)
    d = num_parameters(model)
    try:
        batched = use_vectorized(cfg.train.vectorize, model, d)
    except ValueError:
        batched = False  # reported when the run builds its trainer
    return d, batched


def _sends_bound(cfg: Config, children: int, parents: int, n: int) -> int:
    """An upper bound on the distinct layer-``(n-1)`` children that ever send over link ``n`` in the run: each round
    draws about ``children * prod(fraction_m, m >= n)`` of them (at least one per parent) ``prod(tau_{n+1..N})``
    times."""
    fractions = cfg.participation.fraction or (1.0,) * cfg.N
    share = math.prod(fractions[n - 1 :])
    if share >= 1:
        return children
    per_round = max(math.ceil(children * share * 1.25) + 1, parents)  # rounding: a margin
    return per_round * math.prod(cfg.tau[n:]) * cfg.train.rounds


def sizing(cfg: Config, ranks: int) -> Sizing:
    """What drives the memory of the busiest of ``ranks`` ranks.  Raises what the config's own builders raise
    for a bad tree, data set or model."""
    shape = TreeShape.of(cfg.topology.branching, cfg.topology.tree)
    D, N = shape.devices, len(shape.nodes) - 1
    hosted = -(-D // max(1, ranks))
    notes: list[str] = []
    pooled_bytes, pooled = 0, False
    obj = builders.dataset(cfg)
    if builders.is_generated(obj):
        ds = builders.generated(cfg, obj)
        in_shape, classes = tuple(ds.input_shape), ds.num_classes
        per_device = ds.expected_samples()
    elif cfg.data.name in POOLED_SIZES:
        n_train, n_test, in_shape, classes = POOLED_SIZES[cfg.data.name]
        features = math.prod(in_shape)
        per_device = n_train / max(D, 1)
        pooled, pooled_bytes = True, (n_train + n_test) * features + 4 * features * -(-n_test // ranks)
    elif obj is arrow:
        in_shape, classes = builders.data_spec(cfg)
        n_train, n_test, held = arrow_sizes(cfg.data.root, **cfg.data.args)
        per_device = n_train / max(D, 1)
        pooled, pooled_bytes = True, held + 4 * math.prod(in_shape) * -(-n_test // ranks)
        notes.append("the arrow data set's memory-mapped Arrow files are page cache and not counted; Parquet columns are")
    else:
        in_shape, classes = builders.data_spec(cfg)
        per_device, pooled = 0.0, True
        notes.append(f"the plug-in data set {cfg.data.name!r} is not counted: its size is known only once loaded")
    d, batched = _model_params(cfg, tuple(in_shape), classes)
    sample_bytes = 4 * math.prod(in_shape) + 8
    codecs = builders.codecs(cfg)
    buffers = sum(shape.max_children[n] * codecs[n - 1].nbytes(d) for n in range(1, N + 1)
                  if ranks > 1 and shape.nodes[n] < ranks)  # a node spanning ranks receives remote messages
    state = 0
    ef = cfg.quantizer.error_feedback or (False,) * N
    server = cfg.server.optimizer or ("avg",) * N
    for n in range(1, N + 1):
        if ef[n - 1]:  # a residual exists once a child has sent: at most the sends the run can make
            state += -(-min(shape.nodes[n - 1], _sends_bound(cfg, shape.nodes[n - 1], shape.nodes[n], n)) // ranks)
        try:
            kept = len(make_server_optimizer(server[n - 1]).state_names)
        except (PluginError, TypeError, ValueError):
            kept = 0  # reported when the run builds its optimisers
        state += kept * -(-shape.nodes[n] // ranks)
    return Sizing(devices=D, nodes=sum(shape.nodes[1:]), ranks=ranks, hosted=hosted, classes=classes, params=d,
                  layers=N, sample_bytes=sample_bytes, samples_per_device=per_device, pooled_bytes=pooled_bytes,
                  pooled=pooled, message_buffers=buffers, state_vectors=state,
                  batch_devices=min(CHUNK, hosted, shape.max_children[1]) if batched else 0, notes=tuple(notes),
                  cache_bytes=int(cfg.data.cache_mb * (1 << 20)),
                  test_devices=-1 if pooled or not 0 < cfg.data.test_devices < D else cfg.data.test_devices,
                  test_fraction=cfg.data.synthetic.test_fraction if not pooled else 0.0)


def memory_estimate(cfg: Config, ranks: int) -> MemoryEstimate:
    """The estimated peak memory of the busiest rank (:func:`~qmlhfl_mpi.core.memory.estimate_memory`)."""
    return estimate_memory(sizing(cfg, ranks))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) and garbage are None


def _own_cgroups(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")
                 ) -> list[tuple[Path, str, str]]:
    """The memory cgroup directories of this process, innermost first, each with its limit and usage file names:
    cgroup v2 (``0::/path`` in /proc/self/cgroup) and v1 (``N:memory:/path``), every ancestor included (a SLURM
    job's limit sits on the job's cgroup, above the step's)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        lines = []
    out: list[tuple[Path, str, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in parts[1].split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        rel = Path(parts[2].lstrip("/"))
        for p in [rel, *rel.parents]:
            out.append((base / p, *files))
    return out


def cgroup_room(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes the memory cgroups of this process may still take (the tightest limit minus its usage), or None
    without a limit."""
    rooms = []
    for d, limit_file, usage_file in _own_cgroups(root, proc):
        limit, usage = _read_int(d / limit_file), _read_int(d / usage_file)
        if limit is not None and limit < 1 << 60:  # v1 reports "no limit" as a huge number, v2 as "max"
            rooms.append(max(0, limit - (usage or 0)))
    return min(rooms) if rooms else None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_now() -> int:
    """This process's resident memory now (its peak so far, on Linux in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def available_memory(local_ranks: int, limit_gb: float = 0.0) -> tuple[int, str]:
    """(bytes this rank may use, where the figure comes from).  ``limit_gb > 0`` is taken as given; else the
    smaller of the node's ``MemAvailable`` and its memory cgroup's room, shared by the ``local_ranks`` ranks of
    the run on this node, plus what this rank already holds (counted in the estimate's base)."""
    if limit_gb > 0:
        return int(limit_gb * GiB), f"train.memory_limit_gb = {limit_gb:g}"
    found = [(v, name) for v, name in ((_mem_available(), "MemAvailable"), (cgroup_room(), "the cgroup's limit"))
             if v is not None]
    if not found:
        return 1 << 62, "no memory figure readable on this node"
    room, name = min(found)
    share = room // max(1, local_ranks)
    mine = _rss_now()
    return share + mine, (f"{name} of the node, {room / GiB:.3g} GiB, shared by {local_ranks} rank"
                          f"{'s' if local_ranks != 1 else ''} of this run, plus {mine / GiB:.2g} GiB this rank "
                          f"holds; node {os.uname().nodename}")


def check_memory(cfg: Config, ranks: int, local_ranks: int) -> Sizing | None:
    """Raise :class:`MemoryEstimateError` if the run's estimated peak memory per rank exceeds what a rank has
    (``train.memory_check``); the sizing it checked, or None when the check is off or the config is wrong in a
    way its builders report (a bad tree, data set or model: building the run names the problem).  Each rank
    is assumed to host ``ceil(D / ranks)`` devices; :func:`recheck_memory` corrects that once the layout is
    known."""
    if not cfg.train.memory_check:
        return None
    try:
        s = sizing(cfg, ranks)
    except Exception:  # noqa: BLE001 - a bad tree, data set or model: building the run reports it precisely
        return None
    recheck_memory(s, s.hosted, local_ranks, cfg.train.memory_limit_gb)
    return s


def recheck_memory(s: Sizing | None, hosted: int, local_ranks: int, limit_gb: float = 0.0) -> None:
    """:func:`check_memory` again for a rank that hosts ``hosted`` devices (the layout's busiest rank may host
    more than the even share; nothing is checked for ``s`` None)."""
    if s is None:
        return
    available, source = available_memory(local_ranks, limit_gb)
    problem = fits(replace(s, hosted=max(hosted, s.hosted)), available, source)
    if problem:
        raise MemoryEstimateError(problem)
