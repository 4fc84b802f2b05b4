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
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

PARTITION_KINDS = ("iid", "shards", "dirichlet", "edge-shards")

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
            per_class[room[np.argmax((counts[room] / per_class[room]))]] += 1
        pieces, shard_class = [], []
        for c, chunk in enumerate(np.split(order, np.cumsum(counts)[:-1])):
            pieces.extend(np.array_split(chunk, per_class[c]))
            shard_class.extend([c] * int(per_class[c]))
        shard_class = np.asarray(shard_class)
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
def partition(labels: np.ndarray, num_devices: int, kind: str, seed: int, *, classes_per_device: int = 2,
              alpha: float = 0.5, size_sigma: float = 0.0, classes_per_edge: int = 4,
              groups: Sequence[range] | None = None, min_samples: int = 1) -> list[np.ndarray]:
    """Split the samples ``0..len(labels)-1`` over ``num_devices`` devices.

    Returns one sorted int64 index array per device.  ``iid``, ``shards`` and
    ``dirichlet`` use every sample exactly once; ``edge-shards`` too unless
    there are fewer pool slots (edges * classes_per_edge) than classes.
    Raises ValueError for impossible requests or when a device would get
    fewer than ``min_samples`` samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got dtype={labels.dtype} shape={labels.shape}")
    if kind not in PARTITION_KINDS:
        raise ValueError(f"partition kind={kind!r}: valid kinds are {PARTITION_KINDS}")
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

    if kind == "iid":
        parts = _iid(n, num_devices, seed, size_sigma, min_samples)
    elif kind == "shards":
        parts = _shards(labels, num_devices, classes_per_device, _rng(seed, _SHARDS), "shards")
    elif kind == "dirichlet":
        parts = _dirichlet(labels, num_devices, alpha, seed, min_samples)
    else:
        parts = _edge_shards(labels, num_devices, classes_per_device, classes_per_edge,
                             _check_groups(groups, num_devices), seed)

    out = [np.sort(p).astype(np.int64, copy=False) for p in parts]
    for d, p in enumerate(out):
        if p.size < min_samples:
            raise ValueError(f"{kind}: device {d} got {p.size} samples, fewer than min_samples={min_samples}; "
                             f"use fewer devices or fewer shards/classes per device (valid: >= {min_samples})")
    return out
