"""Partitioning a labelled data set over federated devices (pure numpy).

Every partitioner is a pure function of ``(labels, num_devices, kind, seed,
options)``: randomness comes only from ``np.random.default_rng([seed,
purpose, ...])`` generators, never from global state, so every MPI rank can
compute the same partition independently.  The result is one sorted int64
index array per device; no sample is given to two devices.

Kinds
-----
``iid``
    uniform random split; ``size_sigma > 0`` draws lognormal device sizes.
``shards``
    the paper's high heterogeneity (McMahan et al.'s label shards): the data
    sorted by label is cut into ``num_devices * classes_per_device``
    single-class shards and every device gets ``classes_per_device`` of them,
    from distinct classes where the shard counts allow.
``dirichlet``
    per-class proportions over devices drawn from ``Dirichlet(alpha)``.
``edge-shards``
    edge-level heterogeneity: every edge server (a range of devices in
    ``groups``) gets a pool of ``classes_per_edge`` classes; the pool's samples
    are split over the edge's devices as ``shards`` with ``classes_per_device``.
``natural``
    the data set's own split: ``owners`` gives the owner (writer, user, ...)
    of every sample.  The distinct owner ids, sorted, are dealt to the devices
    in order and in contiguous blocks: with ``O`` owners and ``D <= O``
    devices, owner ``j`` (in sorted order) goes to device ``floor(j D / O)``, so device
    ``k`` gets owners ``ceil(k O / D) .. ceil((k+1) O / D) - 1``
    (one owner each when ``O == D``).  ``O < D`` is an error: some device
    would have no data.

Each kind is a function ``f(request: PartitionRequest) -> list[index array]``
registered in :data:`PARTITIONERS`; a plug-in partitioner is the same
function named as ``module:attr`` or ``file.py:attr`` in
``data.partition.kind``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .registry import PluginError, Registry

log = logging.getLogger(__name__)

# Generators are seeded with [seed, _PARTITION, sub-purpose, ...]; _PARTITION
# equals qmlhfl_mpi.rng.PARTITION (kept literal so this module imports nothing).
_PARTITION = 5
_IID, _SIZES, _SHARDS, _DIRICHLET, _EDGE_POOLS, _EDGE_SPLIT, _EDGE_DEVICES = 1, 2, 3, 4, 5, 6, 7
_DIRICHLET_TRIES = 100
_REPAIR_CANDIDATES = 64


def _rng(seed: int, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, _PARTITION, *purpose])


def _largest_remainder(total: int, weights: np.ndarray, minimum: int = 0) -> np.ndarray:
    """Integers ``>= minimum`` summing to ``total``, proportional to ``weights``
    beyond the minimum (largest-remainder rounding, ties by position)."""
    rest = total - minimum * len(weights)
    ideal = rest * weights / weights.sum()
    counts = np.floor(ideal).astype(np.int64)
    short = rest - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(ideal - counts), kind="stable")[:short]] += 1
    return counts + minimum


def _assign_distinct(slot_class: np.ndarray, num_bins: int, per_bin: int, rng: np.random.Generator) -> np.ndarray:
    """Randomly deal ``num_bins * per_bin`` slots into bins of ``per_bin``, then
    swap slots between bins so that, where possible, no bin holds two slots of
    one class.  Returns an array ``(num_bins, per_bin)`` of slot indices."""
    bins = rng.permutation(slot_class.size).reshape(num_bins, per_bin)
    if per_bin == 1:
        return bins

    def dup(b: int) -> int:
        """Position in bin ``b`` of a slot whose class occurs earlier, or -1."""
        seen: set[int] = set()
        for j, s in enumerate(bins[b]):
            c = int(slot_class[s])
            if c in seen:
                return j
            seen.add(c)
        return -1

    for b in range(num_bins):
        j = dup(b)
        while j >= 0:
            mine = {int(slot_class[s]) for k, s in enumerate(bins[b]) if k != j}
            bad_class = int(slot_class[bins[b, j]])
            for other in rng.permutation(num_bins)[:_REPAIR_CANDIDATES]:
                if other == b:
                    continue
                theirs = [int(slot_class[s]) for s in bins[other]]
                if bad_class in theirs:
                    continue
                # bad_class is not in `other`, so any of its classes new to `b` gives a clean swap
                hit = next((k for k, c in enumerate(theirs) if c not in mine), None)
                if hit is not None:
                    bins[b, j], bins[other, hit] = bins[other, hit], bins[b, j]
                    break
            else:
                break  # no swap found: leave the duplicate (the bin sees fewer classes)
            j = dup(b)
    return bins


def _check_groups(groups: Sequence[range] | None, num_devices: int) -> list[range]:
    if groups is None:
        raise ValueError("partition kind 'edge-shards' needs groups: one device range per edge server, "
                         f"consecutive and covering 0..{num_devices - 1}")
    out, expect = [], 0
    for i, g in enumerate(groups):
        if not isinstance(g, range) or g.step != 1 or g.start != expect or len(g) < 1:  # e.g. Tree.device_range
            raise ValueError(f"groups[{i}]={g!r}: expected a non-empty range(start={expect}, stop) with step 1; "
                             f"the groups must be consecutive and cover devices 0..{num_devices - 1}")
        out.append(g)
        expect = g.stop
    if expect != num_devices:
        raise ValueError(f"groups cover devices 0..{expect - 1} but num_devices={num_devices}: "
                         f"the last group must end at {num_devices}")
    return out


# --------------------------------------------------------------------------- #
def _iid(n: int, num_devices: int, seed: int, size_sigma: float, min_samples: int) -> list[np.ndarray]:
    perm = _rng(seed, _IID).permutation(n)
    if size_sigma > 0:
        if n < num_devices * min_samples:
            raise ValueError(f"iid: {n} samples cannot give each of num_devices={num_devices} devices "
                             f"min_samples={min_samples}; need num_devices * min_samples <= {n}")
        weights = _rng(seed, _SIZES).lognormal(0.0, size_sigma, num_devices)
        sizes = _largest_remainder(n, weights, minimum=min_samples)
        return np.split(perm, np.cumsum(sizes)[:-1])
    return np.array_split(perm, num_devices)


def _shards(labels: np.ndarray, num_devices: int, k: int, rng: np.random.Generator, where: str) -> list[np.ndarray]:
    """Positions into ``labels`` for each device, ``k`` shards per device."""
    n = labels.size
    classes, counts = np.unique(labels, return_counts=True)
    num_shards = num_devices * k
    if num_shards > n:
        raise ValueError(f"{where}: num_devices * classes_per_device = {num_devices} * {k} = {num_shards} shards "
                         f"but only {n} samples; need num_devices * classes_per_device <= {n}")
    if k > classes.size:
        raise ValueError(f"{where}: classes_per_device={k} but only {classes.size} classes present; "
                         f"valid range is 1..{classes.size}")
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]  # label-sorted, random within a class
    if num_shards < classes.size:
        log.warning("%s: only %d shards for %d classes, so shards mix classes and devices may see more than "
                    "classes_per_device=%d classes", where, num_shards, classes.size, k)
        pieces = np.array_split(order, num_shards)
        shard_class = np.arange(num_shards)  # every shard its own 'class' for dealing
    else:
        # shards per class: proportional to the class size, at least 1, at most the class size
        per_class = _largest_remainder(num_shards - classes.size, counts.astype(float), minimum=0) + 1
        while (over := per_class > counts).any():  # only when classes are tiny: move surplus to others
            c = int(np.flatnonzero(over)[0])
            per_class[c] -= 1
            room = np.flatnonzero(per_class < counts)
            per_class[room[np.argmax(counts[room] / per_class[room])]] += 1
        pieces = []
        shard_list: list[int] = []
        for c, chunk in enumerate(np.split(order, np.cumsum(counts)[:-1])):
            pieces.extend(np.array_split(chunk, per_class[c]))
            shard_list.extend([c] * int(per_class[c]))
        shard_class = np.asarray(shard_list)
    bins = _assign_distinct(shard_class, num_devices, k, rng)
    return [np.concatenate([pieces[s] for s in row]) for row in bins]


def _dirichlet(labels: np.ndarray, num_devices: int, alpha: float, seed: int, min_samples: int) -> list[np.ndarray]:
    rng = _rng(seed, _DIRICHLET)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for attempt in range(1, _DIRICHLET_TRIES + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for idx in by_class:
            p = rng.dirichlet(np.full(num_devices, alpha))
            cuts = np.minimum((np.cumsum(p)[:-1] * idx.size).astype(np.int64), idx.size)
            for d, piece in enumerate(np.split(rng.permutation(idx), cuts)):
                parts[d].append(piece)
        out = [np.concatenate(p) for p in parts]
        if min(o.size for o in out) >= min_samples:
            if attempt > 1:
                log.debug("dirichlet: %d draws until every device had >= %d samples", attempt, min_samples)
            return out
    raise ValueError(f"dirichlet: after {_DIRICHLET_TRIES} draws some device still had fewer than "
                     f"min_samples={min_samples} samples (alpha={alpha}, num_devices={num_devices}, "
                     f"{labels.size} samples); raise alpha, lower min_samples or use fewer devices")


def _edge_shards(labels: np.ndarray, num_devices: int, k: int, pool: int, groups: list[range],
                 seed: int) -> list[np.ndarray]:
    classes = np.unique(labels)
    num_edges = len(groups)
    if not 1 <= pool <= classes.size:
        raise ValueError(f"edge-shards: classes_per_edge={pool}; valid range is 1..{classes.size} "
                         f"(the classes present)")
    if k > pool:
        raise ValueError(f"edge-shards: classes_per_device={k} exceeds classes_per_edge={pool}; "
                         f"valid range is 1..{pool}")
    rng = _rng(seed, _EDGE_POOLS)
    slots = num_edges * pool
    if slots >= classes.size:  # every class in >= 1 pool, at most one slot per edge
        per_class = np.full(classes.size, slots // classes.size)
        per_class[rng.permutation(classes.size)[: slots % classes.size]] += 1
    else:
        kept = np.sort(rng.permutation(classes.size)[:slots])
        log.warning("edge-shards: %d edges * classes_per_edge=%d < %d classes; dropping the samples of classes %s",
                    num_edges, pool, classes.size, classes[np.setdiff1d(np.arange(classes.size), kept)].tolist())
        per_class = np.zeros(classes.size, dtype=np.int64)
        per_class[kept] = 1
    slot_class = np.repeat(np.arange(classes.size), per_class)
    edge_slots = _assign_distinct(slot_class, num_edges, pool, rng)
    # split each class's samples over the edges holding it, proportional to their device counts
    split_rng = _rng(seed, _EDGE_SPLIT)
    edge_parts: list[list[np.ndarray]] = [[] for _ in range(num_edges)]
    for c in range(classes.size):
        holders = [e for e in range(num_edges) for s in edge_slots[e] if slot_class[s] == c]
        if not holders:
            continue
        idx = split_rng.permutation(np.flatnonzero(labels == classes[c]))
        sizes = _largest_remainder(idx.size, np.array([len(groups[e]) for e in holders], dtype=float))
        for e, piece in zip(holders, np.split(idx, np.cumsum(sizes)[:-1])):
            edge_parts[e].append(piece)
    out: list[np.ndarray] = []
    for e, g in enumerate(groups):
        pool_idx = np.sort(np.concatenate(edge_parts[e]))
        where = f"edge-shards (edge {e}, devices {g.start}..{g.stop - 1})"
        positions = _shards(labels[pool_idx], len(g), k, _rng(seed, _EDGE_DEVICES, e), where)
        out.extend(pool_idx[p] for p in positions)
    return out


# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class PartitionRequest:
    """Everything a partitioner may use; each kind reads the fields it needs."""

    labels: np.ndarray               # int64 label of every training sample
    num_devices: int
    seed: int
    groups: list[range] | None       # device ranges of the layer-1 (edge) nodes
    owners: np.ndarray | None = None  # owner id of every sample (natural splits)
    classes_per_device: int = 2
    alpha: float = 0.5
    size_sigma: float = 0.0
    classes_per_edge: int = 4
    min_samples: int = 1


Partitioner = Callable[[PartitionRequest], Sequence[np.ndarray]]


def iid(r: PartitionRequest) -> list[np.ndarray]:
    """Uniform random split (lognormal sizes when ``size_sigma > 0``)."""
    return _iid(r.labels.size, r.num_devices, r.seed, r.size_sigma, r.min_samples)


def shards(r: PartitionRequest) -> list[np.ndarray]:
    """``classes_per_device`` single-class shards per device (the paper's high heterogeneity)."""
    return _shards(r.labels, r.num_devices, r.classes_per_device, _rng(r.seed, _SHARDS), "shards")


def dirichlet(r: PartitionRequest) -> list[np.ndarray]:
    """Per-class proportions over devices from ``Dirichlet(alpha)``."""
    return _dirichlet(r.labels, r.num_devices, r.alpha, r.seed, r.min_samples)


def edge_shards(r: PartitionRequest) -> list[np.ndarray]:
    """Edge-level heterogeneity: a pool of ``classes_per_edge`` classes per edge, shards within it."""
    return _edge_shards(r.labels, r.num_devices, r.classes_per_device, r.classes_per_edge,
                        _check_groups(r.groups, r.num_devices), r.seed)


def natural(r: PartitionRequest) -> list[np.ndarray]:
    """The data set's own owners, dealt to the devices in order (see the module docstring)."""
    if r.owners is None:
        raise ValueError("data.partition.kind 'natural' needs a data set that returns the owner of every "
                         "training sample as a third array (x, y, owner)")
    owners = np.asarray(r.owners).reshape(-1)
    if owners.size != r.labels.size:
        raise ValueError(f"natural split: {owners.size} owner ids for {r.labels.size} training samples")
    ids, inverse = np.unique(owners, return_inverse=True)
    n_owners, D = ids.size, r.num_devices
    if n_owners < D:
        raise ValueError(f"natural split: the data set has {n_owners} owners but the tree has {D} devices; every "
                         f"device needs at least one owner, so use a tree of at most {n_owners} devices")
    device_of_owner = (np.arange(n_owners) * D) // n_owners  # contiguous blocks: owner j -> device floor(j D / O)
    dev = device_of_owner[inverse]
    order = np.argsort(dev, kind="stable")
    cuts = np.searchsorted(dev[order], np.arange(1, D))
    return list(np.split(order, cuts))


PARTITIONERS = Registry("partitioner", "data.partition.kind")
PARTITIONERS.register("iid", iid, "uniform random split (lognormal sizes with size_sigma > 0)")
PARTITIONERS.register("shards", shards, "classes_per_device single-class shards per device (the paper's high "
                      "heterogeneity)")
PARTITIONERS.register("dirichlet", dirichlet, "per-class proportions over devices from Dirichlet(alpha)")
PARTITIONERS.register("edge-shards", edge_shards, "edge-level heterogeneity: a pool of classes_per_edge classes "
                      "per edge server, shards within it")
PARTITIONERS.register("natural", natural, "the data set's own owners (a third array), dealt to the devices in "
                      "sorted order and contiguous blocks")
PARTITION_KINDS = PARTITIONERS.names()


def partition(labels: np.ndarray, num_devices: int, kind: str, seed: int, *, classes_per_device: int = 2,
              alpha: float = 0.5, size_sigma: float = 0.0, classes_per_edge: int = 4,
              groups: Sequence[range] | None = None, min_samples: int = 1,
              owners: np.ndarray | None = None) -> list[np.ndarray]:
    """Split the samples ``0..len(labels)-1`` over ``num_devices`` devices with
    the partitioner ``kind`` (a name of :data:`PARTITIONERS` or a plug-in reference).

    Returns one sorted int64 index array per device.  ``iid``, ``shards``,
    ``dirichlet`` and ``natural`` use every sample exactly once; ``edge-shards``
    too unless there are fewer pool slots (edges * classes_per_edge) than
    classes.  Raises ValueError for impossible requests or when a device would
    get fewer than ``min_samples`` samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got dtype={labels.dtype} shape={labels.shape}")
    PARTITIONERS.check(kind)
    for name, value, low in (("num_devices", num_devices, 1), ("seed", seed, 0), ("min_samples", min_samples, 0),
                             ("classes_per_device", classes_per_device, 1),
                             ("classes_per_edge", classes_per_edge, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r}: the Dirichlet concentration must be a finite number > 0")
    if not (np.isfinite(size_sigma) and size_sigma >= 0):
        raise ValueError(f"size_sigma={size_sigma!r}: must be a finite number >= 0 (0 = equal sizes)")
    n = labels.size
    if n < num_devices * min_samples:
        raise ValueError(f"{n} samples cannot give each of num_devices={num_devices} devices "
                         f"min_samples={min_samples}; need num_devices * min_samples <= {n}")
    request = PartitionRequest(labels, int(num_devices), int(seed),
                               list(groups) if groups is not None else None, owners,
                               int(classes_per_device), float(alpha), float(size_sigma), int(classes_per_edge),
                               int(min_samples))
    fn = PARTITIONERS.resolve(kind)
    if not callable(fn):
        raise PluginError(f"data.partition.kind {kind!r}: {fn!r} is not callable; a partitioner is "
                          "f(request: PartitionRequest) -> list of index arrays")
    parts = list(fn(request))
    if len(parts) != num_devices:
        raise ValueError(f"partitioner {kind!r} returned {len(parts)} index arrays for {num_devices} devices")

    out = [np.sort(np.asarray(p)).astype(np.int64, copy=False) for p in parts]
    for d, p in enumerate(out):
        if p.size and (p.min() < 0 or p.max() >= n):
            raise ValueError(f"partitioner {kind!r}: device {d} got sample indices outside 0..{n - 1}")
        if p.size < min_samples:
            raise ValueError(f"{kind}: device {d} got {p.size} samples, fewer than min_samples={min_samples}; "
                             f"use fewer devices or fewer shards/classes per device (valid: >= {min_samples})")
    return out
