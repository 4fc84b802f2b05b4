"""Peak memory per rank, estimated before anything is allocated, and the verdict against what is available.

Pure: numbers in, numbers out (the config is turned into a :class:`Sizing` by
:mod:`qmlhfl_mpi.config.sizing`; what a node has available is read by
:mod:`qmlhfl_mpi.run.resources`).  The estimate is a sum of terms, each a
linear function of one driver (devices in the tree, devices on the rank,
model parameters, ...), so the largest size that fits follows from the term
that dominates.  The constants were fitted to measured peak RSS on the
development machine (docs/performance.md, "memory"); the estimate aims to be
within about 25% and errs high.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

__all__ = ["BASE_BYTES", "BATCHED_BASE_BYTES", "MemoryEstimate", "MemoryEstimateError", "Sizing", "Term",
           "estimate_memory", "fits", "format_bytes", "largest_tree", "ranks_needed", "with_devices"]

MiB = 1 << 20
BASE_BYTES = 640 * MiB
"""The interpreter with torch (its CUDA build imports 0.5 GB), numba's compiled kernels, MPI and h5py: the
measured peak of a small run that trains one device at a time is about 0.65 GB."""
BATCHED_BASE_BYTES = 200 * MiB
"""What batched training (``torch.func.vmap``) adds once, whatever the batch: a small batched run peaks at
about 0.84 GB."""
PER_DEVICE_BYTES = 48
"""Every rank holds arrays over all devices: the tree's boundaries and the sample counts (and their sum over
ranks at start-up)."""
PER_DEVICE_CLASS_BYTES = 16
"""Per device and class: the class-count table rank 0 writes into the results file (int64, and h5py's copy)."""
PER_PARTITION_BYTES = 160
"""A pooled data set's partition: one index array object per device, on every rank (plus 8 bytes a sample)."""
HOSTED_DATA_COPIES = 1.25
"""A device's training samples are held once as float32 tensors while it is cached; the generator's float64
draws pass through."""
PER_HOSTED_BYTES = 120
"""Per hosted device: its entry in the class counts known but not yet written (pooled data: all of them)."""
PER_CACHED_BYTES = 1024
"""Per cached device: its tensors' and the cache's own objects."""
MODEL_COPIES = 12
"""Float32 copies of the model a rank keeps at once besides the per-layer ones: the torch module's
parameters and gradients, the flat vectors of the trainer, the cloud model, the evaluation's copy."""
LAYER_COPIES = 3
"""Per aggregation layer: the node's model, its accumulator and the child's result in flight."""
BATCH_COPIES = 5
"""Per device trained in one batch (``train.vectorize``): stacked parameters, gradients, momentum, result."""


class MemoryEstimateError(ValueError):
    """The estimated peak memory of a rank exceeds what it has available."""


@dataclass(frozen=True)
class Sizing:
    """What drives the memory of the busiest rank (all counts, known before anything is built)."""

    devices: int                # devices in the tree (D)
    nodes: int                  # nodes above the devices, all layers
    ranks: int                  # ranks of the run
    hosted: int                 # devices on the busiest rank
    classes: int                # classes (1 for regression)
    params: int                 # model parameters (d)
    layers: int                 # aggregation layers (N)
    sample_bytes: int           # bytes of one sample in memory (float32 features and the label)
    samples_per_device: float   # mean samples of a device (training and test)
    pooled_bytes: int = 0       # a pooled data set's arrays, loaded on every rank (0: generated data)
    pooled: bool = False        # a pooled data set (partitioned by index arrays)
    cache_bytes: int = 1 << 62  # data.cache_mb: the most bytes of drawn devices' data a rank keeps
    test_devices: int = -1      # devices whose held-out samples are the test set (-1: every device; generated data)
    test_fraction: float = 0.2  # share of a generated device's samples held out
    message_buffers: int = 0    # bytes of messages a rank may receive at once (posted receives)
    state_vectors: int = 0      # vectors of per-node state on the busiest rank (residuals, server state)
    batch_devices: int = 0      # devices trained together in one batch (0: one at a time)
    notes: tuple[str, ...] = field(default=())  # what the estimate cannot count


@dataclass(frozen=True)
class Term:
    """One part of the estimate: ``bytes = per_unit * units`` of the named driver (``units`` 1 for a fixed part)."""

    what: str
    per_unit: float
    units: int
    driver: str = ""             # the quantity that scales it ("" for a fixed part)
    fix: str = ""                # how to make it smaller

    @property
    def bytes(self) -> int:
        return int(math.ceil(self.per_unit * self.units))


@dataclass(frozen=True)
class MemoryEstimate:
    terms: tuple[Term, ...]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def dominant(self) -> Term:
        """The scalable term with the most bytes (the base if none scales)."""
        scalable = [t for t in self.terms if t.driver]
        return max(scalable or list(self.terms), key=lambda t: t.bytes)

    def lines(self) -> list[str]:
        """One line per term, largest first, and the notes."""
        out = [f"{format_bytes(t.bytes):>10}  {t.what}" for t in sorted(self.terms, key=lambda t: -t.bytes)]
        return out + [f"            ({n})" for n in self.notes]


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with three significant digits (``1.23 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError


def estimate_memory(s: Sizing) -> MemoryEstimate:
    """The estimated peak memory of the busiest rank, term by term (see the module doc)."""
    per_device = PER_DEVICE_BYTES + PER_DEVICE_CLASS_BYTES * max(s.classes, 1) + \
        (PER_PARTITION_BYTES if s.pooled else 0)
    layer_copies = MODEL_COPIES + LAYER_COPIES * s.layers
    device_bytes = HOSTED_DATA_COPIES * s.samples_per_device * s.sample_bytes
    train_bytes = device_bytes * (1 - s.test_fraction) if not s.pooled else device_bytes
    cached = min(s.hosted, int(s.cache_bytes // max(train_bytes, 1)) + 1)
    tested = s.hosted if s.test_devices < 0 else min(s.hosted, -(-s.test_devices // max(s.ranks, 1)))
    terms = [
        Term("interpreter, torch, numba, MPI, h5py", BASE_BYTES, 1),
        Term(f"arrays over all {s.devices:,} devices of the tree (every rank holds them)", per_device, s.devices,
             "devices in the tree", "a smaller tree (topology.branching / topology.tree)"),
        Term(f"{s.nodes:,} aggregation nodes", 64, s.nodes, "nodes", "a smaller tree"),
        Term(f"training data of the devices drawn on this rank, kept up to data.cache_mb "
             f"({s.samples_per_device:.4g} samples of {s.sample_bytes:,} bytes a device)",
             min(float(s.cache_bytes), s.hosted * train_bytes) + PER_CACHED_BYTES * cached, 1,
             "", "a smaller data.cache_mb"),
        Term(f"bookkeeping of the {s.hosted:,} devices on this rank", PER_HOSTED_BYTES, s.hosted,
             "devices per rank", "more ranks"),
        Term(f"model vectors (d = {s.params:,} float32, {layer_copies} copies)", 4 * layer_copies, s.params,
             "model parameters", "a smaller model"),
    ]
    if not s.pooled and tested:
        terms.append(Term(f"held-out data of the {tested:,} test devices on this rank", device_bytes * s.test_fraction,
                          tested, "devices per rank" if s.test_devices < 0 else "",
                          "data.test_devices (a sample of the devices for the test set)"))
    if s.pooled_bytes:
        terms.append(Term("the pooled data set, loaded on every rank", s.pooled_bytes, 1))
    if s.message_buffers:
        terms.append(Term("messages received at once (one buffer per remote child)", s.message_buffers, 1))
    if s.state_vectors:
        terms.append(Term(f"per-node state on this rank ({s.state_vectors:,} vectors of d float32: residuals, "
                          "server optimisers)", 4 * s.state_vectors, s.params, "",
                          "fewer stateful links (quantizer.error_feedback, server.optimizer)"))
    if s.batch_devices:
        terms.append(Term(f"batched training ({s.batch_devices} devices at once)",
                          4 * BATCH_COPIES * s.batch_devices * s.params + BATCHED_BASE_BYTES, 1, "",
                          "train.vectorize: off"))
    return MemoryEstimate(tuple(terms), s.notes)


def with_devices(s: Sizing, devices: int) -> Sizing:
    """``s`` for a tree of the same shape scaled to ``devices`` devices, on the same ranks."""
    f = devices / max(s.devices, 1)
    return replace(s, devices=devices, nodes=max(1, round(s.nodes * f)), hosted=-(-devices // max(s.ranks, 1)),
                   state_vectors=round(s.state_vectors * min(1.0, f)))


def largest_tree(s: Sizing, available: int) -> int:
    """The most devices a tree of this shape may have on these ranks and fit ``available`` bytes (0: none)."""
    if estimate_memory(with_devices(s, 1)).total > available:
        return 0
    lo, hi = 1, max(s.devices, 1)
    while lo < hi:  # the estimate grows with the devices
        mid = (lo + hi + 1) // 2
        if estimate_memory(with_devices(s, mid)).total <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


def ranks_needed(s: Sizing, available: int) -> int | None:
    """The fewest ranks (each with ``available`` bytes) that fit this tree, or None if no rank count does
    (what every rank holds for the whole tree is too much by itself)."""
    if estimate_memory(replace(s, ranks=s.devices, hosted=1)).total > available:
        return None
    lo, hi = max(s.ranks, 1), max(s.devices, 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate_memory(replace(s, ranks=mid, hosted=-(-s.devices // mid))).total <= available:
            hi = mid
        else:
            lo = mid + 1
    return lo


def fits(s: Sizing, available: int, source: str) -> str | None:
    """``None`` if the estimate of ``s`` fits ``available`` bytes per rank, else the message that refuses the
    run: the estimate, what drives it, and the largest sizes that fit.  ``source`` says where ``available``
    comes from."""
    est = estimate_memory(s)
    if est.total <= available:
        return None
    parts = "; ".join(f"{format_bytes(t.bytes)} {t.what}" for t in sorted(est.terms, key=lambda t: -t.bytes)[:4])
    msg = (f"this run needs an estimated {format_bytes(est.total)} of memory per rank but {format_bytes(available)} "
           f"are available ({source}). Largest parts: {parts}.")
    top = est.dominant()
    if top.driver == "model parameters":
        room = available - (est.total - top.bytes)
        msg += f" A model of at most {max(0, int(room // top.per_unit)):,} parameters fits (now {s.params:,})."
    else:
        most = largest_tree(s, available)
        msg += (f" A tree of this shape fits with at most {most:,} devices on {s.ranks} rank"
                f"{'s' if s.ranks != 1 else ''} (now {s.devices:,})" if most else
                " Not even a one-device tree of this kind fits")
        need = ranks_needed(s, available)
        if need is None:
            msg += "; no rank count fits this tree, since every rank holds arrays over all of its devices."
            return msg + " Use a smaller tree." + _OVERRIDE
        msg += f"; this tree needs at least {need:,} ranks with this much memory each." if need > s.ranks else "."
    return msg + (f" Otherwise: {top.fix}." if top.fix else "") + _OVERRIDE


_OVERRIDE = (" The estimate (docs/hpc.md, 'Sizing') can be replaced by train.memory_limit_gb, or the check switched "
             "off with train.memory_check: false.")
