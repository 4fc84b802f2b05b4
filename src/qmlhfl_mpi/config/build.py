"""The builders: runtime objects made from a :class:`~.schema.Config`, once (by :mod:`qmlhfl_mpi.run.runtime`).

Everything below this module (data, learning, communication, results, the
pure core) receives typed pieces (a tree, codecs, a data set, a model),
never the whole config.  Not collective: the session agrees on the errors
these raise.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..accel import TorchVectors
from ..core import rng
from ..core.clock import SystemModel
from ..core.codecs import Codec, link_codecs, make_codec
from ..core.codecs.intsum import IntSumCodec
from ..core.failures import EdgeFailures, Outage
from ..core.links import Link
from ..core.mobility import MarkovMoves, Mobility, MobilityModel, RandomMoves, Static, TraceMoves
from ..core.participation import Participation, sample_size
from ..core.partition import partition
from ..core.policy import Policy, SecureThreshold, make_policy
from ..core.privacy import Accountant, Mechanism
from ..core.schedule import LRSchedule
from ..core.server_opt import ServerOptimizer, make_server_optimizer
from ..core.system import Availability, DeviceTrace, LinkTrace, SystemSpec, TraceError, read_table
from ..core.theory import LatencyModel
from ..core.topology import Tree, TreeShape
from ..core.vectors import HostVectors, Vectors
from ..data.local import (
    LocalData,
    generated_local_data,
    num_classes_of,
    pooled_local_data,
)
from ..data.registry import DATASETS
from ..data.source import DataError, GeneratedDataset, Pooled, load_pooled, take
from ..learning.models import build_model, num_parameters
from ..learning.train import ClientOptimizer
from .dynamics import check_modulus, int_scales, noise_layer, outages
from .schema import Config, ConfigError, server_betas, system_distributions

__all__ = ["client_optimizer", "codecs", "data_seed", "data_spec", "downlink_codecs", "latency", "links",
           "local_data", "lr_schedule", "mobility", "model", "model_dim", "participation", "policies", "server_optimizers",
           "split_validation", "system", "tensor_sizes", "vectors"]


def tensor_sizes(cfg: Config) -> tuple[int, ...] | None:
    """The model's parameter tensor sizes when ``quantizer.bucket`` is ``tensor`` (else ``None``):
    the model is built for them."""
    if cfg.quantizer.bucket != "tensor":
        return None
    shape, classes = data_spec(cfg)
    return tuple(p.numel() for p in model(cfg, shape, classes).parameters())


def codecs(cfg: Config, sizes: tuple[int, ...] | None = None) -> list[Codec]:
    """One codec per link from ``quantizer.kind``, ``levels``, ``bucket`` and ``topk_fraction``;
    ``sizes`` are the model's tensor sizes (found from the config when needed and not given)."""
    q = cfg.quantizer
    if sizes is None:
        sizes = tensor_sizes(cfg)
    shape = TreeShape.of(cfg.topology.branching, cfg.topology.tree)
    p = cfg.privacy  # distributed DP keeps the noise's tail inside the modulus: the codes' count matters
    dim = sum(sizes) if sizes else model_dim(cfg) if p.placement == "distributed" and p.clip > 0 else 0
    scales = int_scales(cfg, shape, dim)
    if dim and q.kind and q.kind[0] == "intsum":
        check_modulus(cfg, shape, scales[0], dim)
    return link_codecs(q.levels, q.bucket, q.kind, q.topk_fraction, sizes, scales, q.rotate)


def downlink_codecs(cfg: Config, sizes: tuple[int, ...] | None = None) -> list[Codec | None]:
    """Per link, the qsgd codec of ``quantizer.downlink`` (``None``: float32)."""
    q = cfg.quantizer
    if sizes is None and any(q.downlink):
        sizes = tensor_sizes(cfg)
    return [make_codec(s, q.bucket, "qsgd", tensor_sizes=sizes) if s else None
            for s in (q.downlink or (0,) * cfg.N)]


def participation(cfg: Config) -> Participation:
    p, N = cfg.participation, cfg.N
    return Participation(p.fraction or (1.0,) * N, p.availability or (1.0,) * N, p.weighting)


def server_optimizers(cfg: Config) -> list[ServerOptimizer]:
    """One optimiser per layer from ``server.*`` (each optimiser's defaults for keys left empty)."""
    s, N = cfg.server, cfg.N
    betas = server_betas(s.betas, N)
    out = []
    for n in range(N):
        params: dict[str, Any] = {"betas": betas[n]}
        for key in ("lr", "momentum", "eps"):
            vals = getattr(s, key)
            if vals:
                params[key] = vals[n]
        out.append(make_server_optimizer(s.optimizer[n] if s.optimizer else "avg", **params))
    return out


def links(cfg: Config, sizes: tuple[int, ...] | None = None) -> tuple[Link, ...]:
    """Every link's codecs, error feedback and server optimiser, resolved once (length N, cloud last);
    ``sizes`` are the model's tensor sizes (for ``quantizer.bucket: tensor``)."""
    if sizes is None:
        sizes = tensor_sizes(cfg)
    ef = cfg.quantizer.error_feedback or (False,) * cfg.N
    return tuple(Link(codec, bool(e), server, down) for codec, e, server, down in
                 zip(codecs(cfg, sizes), ef, server_optimizers(cfg), downlink_codecs(cfg, sizes), strict=True))


def error_feedback_warnings(error_feedback: tuple[bool, ...], codecs: list[Codec], dim: int) -> list[str]:
    """One warning per link with error feedback whose codec is not a contraction (``q_n >= 1``).

    Error feedback is stable when ``||Q(x) - x||^2 <= (1 - delta) ||x||^2`` for some ``delta > 0``
    (Stich et al. 2018; Karimireddy et al. 2019).  An unbiased QSGD link with ``q_n >= 1`` (few levels,
    long buckets) is not one: its residual can grow every round, and the run may diverge (docs/experiments.md,
    study 3: qsgd s = 1, bucket 512, q = 22.6 with EF diverges in every seed)."""
    out = []
    for n, (ef, codec) in enumerate(zip(error_feedback, codecs), start=1):
        q = float(codec.variance(dim)) if ef else 0.0
        if ef and q >= 1:
            out.append(f"quantizer.error_feedback on link {n} with {codec.name} (q = {q:.4g} >= 1): error feedback "
                       "needs a contractive codec (||Q(x) - x||^2 < ||x||^2, q < 1), so the residuals may grow and "
                       "the run diverge; quantize the link more finely (more levels, smaller buckets), use topk or "
                       "sign, or switch error feedback off there")
    return out


def vectors(aggregate_on: str, device: torch.device) -> Vectors:
    """The aggregation's vector backend for ``train.aggregate_on`` on the training ``device``: ``host``
    (numpy), ``device`` (torch tensors on ``device``, a CPU included), ``auto`` (device on a GPU)."""
    if aggregate_on == "device" or (aggregate_on == "auto" and device.type != "cpu"):
        return TorchVectors(device)
    if aggregate_on not in ("auto", "host"):
        raise ValueError(f"train.aggregate_on = {aggregate_on!r}: expected auto, host or device")
    return HostVectors()


def client_optimizer(cfg: Config) -> ClientOptimizer:
    t = cfg.train
    return ClientOptimizer(momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay, prox_mu=t.prox_mu)


def lr_schedule(cfg: Config) -> LRSchedule | None:
    """The learning rate per round, or ``None`` for a constant ``train.lr``."""
    t = cfg.train
    if t.lr_schedule == "constant":
        return None
    return LRSchedule(kind=t.lr_schedule, lr=t.lr, step_rounds=t.lr_step_rounds, gamma=t.lr_gamma, lr_min=t.lr_min,
                      rounds=t.rounds)


def latency(cfg: Config) -> LatencyModel:
    """The deadline model's per-step time and per-link rates and latencies."""
    return LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())


def system(cfg: Config, tree: Tree) -> SystemModel:
    """The system model of ``system:`` over ``latency:`` (docs/system.md), its trace files read; raises
    :class:`~qmlhfl_mpi.core.system.TraceError` naming the key for a missing or malformed trace."""
    s, N = cfg.system, cfg.N
    speed, jitter, spread = system_distributions(cfg)
    spec = SystemSpec(
        speed=speed, jitter=jitter, link_spread=spread, down_rate=s.down_rate, down_latency=s.down_latency,
        shared=tuple(c == "shared" for c in s.contention), ingress_rate=s.ingress_rate,
        device_trace=DeviceTrace.read(s.device_trace, "system.device_trace") if s.device_trace else None,
        link_trace=LinkTrace.read(s.link_trace, "system.link_trace", [tree.num_nodes(n) for n in range(N)])
        if s.link_trace else None,
        availability=Availability.read(s.availability_trace, "system.availability_trace", tree.num_devices,
                                       s.availability_period) if s.availability_trace else None)
    return SystemModel.build(tree, latency(cfg), spec, cfg.train.seed if s.seed is None else s.seed)


def policies(cfg: Config) -> tuple[Policy, ...]:
    """Every layer's aggregation policy (``aggregation:``, cloud last)."""
    a, N = cfg.aggregation, cfg.N
    out = []
    for n in range(N):
        out.append(make_policy(a.policy[n] if a.policy else "all", deadline=a.deadline[n] if a.deadline else 0.0,
                               min_children=a.min_children[n] if a.min_children else 1, k=a.k[n] if a.k else 1,
                               buffer=a.buffer[n] if a.buffer else 1,
                               staleness=a.staleness[n] if a.staleness else "constant"))
    p = cfg.privacy
    for n, secure in enumerate(p.secure_aggregation):
        if secure and p.secure_threshold > 1:  # a key group with fewer survivors aborts
            out[n] = SecureThreshold(out[n], p.secure_threshold)
    return tuple(out)


def mobility(cfg: Config, tree: Tree) -> Mobility:
    """The tree of the moment of every round (``mobility:`` and ``failures:``), its files read; raises
    :class:`~qmlhfl_mpi.core.system.TraceError` or :class:`~.schema.ConfigError` naming the key."""
    m, E = cfg.mobility, tree.num_nodes(1)
    seed = cfg.train.seed if m.seed is None else m.seed
    model: MobilityModel = Static()
    try:
        if m.model == "random":
            model = RandomMoves(m.p, m.neighbours, seed)
        elif m.model == "markov":
            model = MarkovMoves(_matrix(m.matrix, "mobility.matrix"), seed)
            if model.cum.shape[0] != E:
                raise ValueError(f"{model.cum.shape[0]} rows but the tree has {E} edge servers: give an {E} x {E} "
                                 "matrix, row i the probabilities of moving from edge i to each edge")
        elif m.model == "trace":
            t = read_table(m.trace, "mobility.trace", ("round", "device", "edge"))
            rows = np.stack([t["round"], t["device"], t["edge"]], axis=1)
            if (rows != np.round(rows)).any():
                raise ValueError("round, device and edge must be integers")
            model = TraceMoves(rows.astype(np.int64), tree.num_devices, E)
    except TraceError:
        raise
    except ValueError as e:
        key = {"markov": "mobility.matrix", "trace": "mobility.trace"}.get(m.model, "mobility.p")
        raise ConfigError(f"config key '{key}' = {getattr(m, key.split('.')[1])!r}: {e}") from None
    f = cfg.failures
    spans = outages(f.intervals, E)
    if f.trace:
        t = read_table(f.trace, "failures.trace", ("edge", "start", "end"), ("fallback",))
        fb = t.get("fallback", np.full(len(t["edge"]), np.nan))
        raw = [[e, a, b] + ([x] if np.isfinite(x) else []) for e, a, b, x in
               zip(t["edge"].tolist(), t["start"].tolist(), t["end"].tolist(), fb.tolist(), strict=True)]
        spans += outages(raw, E, f"failures.trace ({f.trace})")
    parent = np.searchsorted(tree.starts[2], tree.starts[1][:-1], side="right") - 1 if tree.N >= 2 \
        else np.zeros(E, dtype=np.int64)
    failures = EdgeFailures([Outage(*r) for r in spans], E, parent, f.unit, f.fallback)
    return Mobility(tree, model, failures)


def _matrix(path: str, key: str) -> np.ndarray:
    """A text matrix (spaces or commas, ``#`` comments); raises :class:`TraceError` naming ``key``."""
    try:
        with open(path) as fh:
            rows = [line.split("#", 1)[0].replace(",", " ").split() for line in fh]
        return np.array([[float(x) for x in r] for r in rows if r], dtype=np.float64)
    except OSError as e:
        raise TraceError(f"config key '{key}' = {path!r}: cannot be read ({e.strerror or e}); give the path of a "
                         "text file of E rows of E probabilities") from None
    except ValueError as e:
        raise TraceError(f"config key '{key}' = {path!r}: not a matrix of numbers, one row per line ({e})") from None


def dataset(cfg: Config) -> Any:
    return DATASETS.resolve(cfg.data.name)


def data_seed(cfg: Config) -> int:
    """The seed of the data split and of generated data: ``data.partition.seed``, else ``train.seed``."""
    seed = cfg.data.partition.seed
    return cfg.train.seed if seed is None else seed


def generated(cfg: Config, obj: Any) -> GeneratedDataset:
    """A generated data set gets the data seed (:func:`data_seed`), the ``data.synthetic`` section and
    ``data.args``."""
    try:
        return obj(data_seed(cfg), **{**dataclasses.asdict(cfg.data.synthetic), **cfg.data.args})
    except TypeError as e:
        raise DataError(f"data set {cfg.data.name!r} with data.args={cfg.data.args!r}: {e}") from None


def is_generated(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, GeneratedDataset)


def _pooled(cfg: Config, obj: Any, train: bool) -> Pooled:
    if not callable(obj):
        raise DataError(f"data set {cfg.data.name!r}: {obj!r} is not callable; a data-set plug-in is a function "
                        "f(root, train, **data.args) returning (x, y) or (x, y, owner)")
    args = dict(cfg.data.args)
    if cfg.data.download:
        args["download"] = True
    return load_pooled(obj, cfg.data.name, cfg.data.root, train, args)


def local_data(cfg: Config, tree: Tree, devices: Sequence[int], rank: int, num_ranks: int,
               all_samples: bool = True) -> LocalData:
    """The data of the devices ``devices`` that ``rank`` of ``num_ranks`` hosts, made when drawn.
    ``all_samples``: count every device's training samples on this rank (else a generated data set counts only
    ``devices``' and leaves the sum over ranks to the caller: :attr:`LocalData.samples_complete`)."""
    obj = dataset(cfg)
    cache = int(cfg.data.cache_mb * (1 << 20))
    if is_generated(obj):
        return generated_local_data(generated(cfg, obj), tree.num_devices, devices, cache_bytes=cache,
                                    test_devices=cfg.data.test_devices, all_samples=all_samples,
                                    validation=cfg.data.validation)
    train = _pooled(cfg, obj, True)
    test = _pooled(cfg, obj, False)
    keep = None
    if cfg.data.validation > 0:  # a keyed share of the training set replaces the test split
        test, keep = split_validation(train, cfg.data.validation, data_seed(cfg))
    if test.input_shape != train.input_shape:
        raise DataError(f"data set {cfg.data.name!r}: test samples have shape {test.input_shape} but training "
                        f"samples {train.input_shape}")
    if test.regression != train.regression:
        raise DataError(f"data set {cfg.data.name!r}: the training split has {train.y.dtype} targets and the "
                        f"test split {test.y.dtype}; both must be class labels or both regression targets")
    p = cfg.data.partition
    labels = np.zeros(len(train), dtype=np.int64) if train.regression else train.y  # targets: no label skew
    if keep is not None:
        labels = labels[keep]
    try:
        parts = partition(labels, tree.num_devices, p.kind, data_seed(cfg), classes_per_device=p.classes_per_device,
                          alpha=p.alpha, size_sigma=p.size_sigma, classes_per_edge=p.classes_per_edge,
                          groups=[tree.device_range(1, u) for u in range(tree.num_nodes(1))],
                          owners=train.owner if keep is None or train.owner is None else train.owner[keep])
    except ValueError as e:
        raise DataError(f"data.partition.kind {p.kind!r} on data set {cfg.data.name!r} "
                        f"({len(labels)} training samples, {tree.num_devices} devices): {e}") from None
    if keep is not None:  # the partition's indices are into the kept samples: map them back
        parts = [keep[q] for q in parts]
    return pooled_local_data(train, test, parts, devices, rank, num_ranks, cache_bytes=cache)


def split_validation(train: Pooled, fraction: float, seed: int) -> tuple[Pooled, np.ndarray]:
    """``(validation, keep)``: a keyed ``fraction`` of ``train`` (stream ``(seed, VALIDATION)``, the same for any
    rank count) becomes the validation split; ``keep`` are the ascending indices of ``train`` left to partition."""
    n = len(train)
    m = int(round(fraction * n))
    if not 1 <= m < n:
        raise DataError(f"data.validation={fraction!r} of {n} training samples holds out {m}: expected at least one "
                        "and fewer than all; raise or lower data.validation")
    order = rng.stream(seed, rng.VALIDATION).permutation(n)
    held, keep = np.sort(order[:m]), np.sort(order[m:])
    y = np.ascontiguousarray(train.y[held])
    val = Pooled(take(train.x, held).numpy(), y, None if train.owner is None else train.owner[held])
    return val, keep


def data_spec(cfg: Config) -> tuple[tuple[int, ...], int]:
    """(input shape, outputs) of the configured data set; a pooled data set's test split is loaded for it."""
    obj = dataset(cfg)
    if is_generated(obj):
        ds = generated(cfg, obj)
        return ds.input_shape, ds.num_classes
    test = _pooled(cfg, obj, False)
    return test.input_shape, num_classes_of(test, test)


def model(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The configured model with its parameters initialised (``model.init``)."""
    return build_model(cfg.model.name, input_shape, num_classes, args=cfg.model.args, seed=cfg.train.seed,
                       init=cfg.model.init)


def model_dim(cfg: Config) -> int:
    """Parameters of the configured model (the message length ``d``)."""
    shape, classes = data_spec(cfg)
    return num_parameters(model(cfg, shape, classes))


def privacy(cfg: Config, tree: Tree, dim: int, uplinks: Sequence[Codec], check_target: bool = True
            ) -> tuple[Mechanism, Accountant] | None:
    """The privacy mechanism and its accountant (docs/privacy.md), or ``None`` without ``privacy.clip``; raises
    :class:`~.schema.ConfigError` for a link-1 codec without a norm bound, a lossy link between the devices and
    an edge or central noise layer, or (``check_target``: it takes the accountant) a ``privacy.target_epsilon``
    the first round already exceeds."""
    p = cfg.privacy
    if not p.clip > 0:
        return None
    L, q = noise_layer(cfg, tree.N), cfg.quantizer
    kappa, shares = 1.0, (0, 0)
    if p.placement == "distributed":  # the shares go into link 1's integer codes: their count and the modulus
        codec = uplinks[0]
        assert isinstance(codec, IntSumCodec)
        check_modulus(cfg, TreeShape.of(cfg.topology.branching, cfg.topology.tree), codec.scale, dim)
        shares = (codec.length(dim), p.secure_threshold)
        least = p.noise_multiplier * math.sqrt(shares[0] / shares[1])
        if p.noise_multiplier and least < 0.5:
            raise ConfigError(f"config key 'privacy.noise_multiplier' = {p.noise_multiplier:g}: a device's discrete "
                              f"Gaussian share may have std {least:.3g} < 1/2 code, below what the distributed "
                              "bound covers (Kairouz et al.); raise the noise multiplier or lower "
                              "privacy.secure_threshold")
    elif L >= 1:
        got = uplinks[0].norm_factor(dim)
        if got is None:
            raise ConfigError(f"config key 'quantizer.kind' = {list(q.kind)}: link 1's codec {uplinks[0].name} "
                              f"has no known norm bound, so one device's share of the noised sum at layer {L} is "
                              "unbounded; use qsgd, round, topk, sign or none on link 1, or privacy.placement: local")
        kappa = float(got)
        for n in range(2, L + 1):
            c = uplinks[n - 1]
            if c.variance(dim) != 0 or c.norm_factor(dim) != 1.0:
                raise ConfigError(f"config key 'quantizer.levels' = {list(q.levels)}: link {n} ({c.name}) lies between "
                                  f"the devices and the noise at layer {L}; quantizing a sum there breaks its "
                                  f"sensitivity bound, so give it 0 levels (float32), or add the noise lower")
    delta = p.delta or 1.0 / tree.num_devices
    f1 = cfg.participation.fraction[0] if cfg.participation.fraction else 1.0
    edges = {(n, sample_size(f1, n)) for n in (len(tree.children(1, e)) for e in range(tree.num_nodes(1))) if n}
    accountant = Accountant.of(p.noise_multiplier, L, cfg.tau, sorted(edges), delta, shares)
    if check_target and p.target_epsilon and accountant.epsilon(1) > p.target_epsilon:
        raise ConfigError(f"config key 'privacy.target_epsilon' = {p.target_epsilon:g} is unreachable: one round "
                          f"already spends epsilon = {accountant.epsilon(1):.4g} at delta = {delta:.3g}; raise the "
                          "target or privacy.noise_multiplier")
    return Mechanism(p.clip, p.noise_multiplier, L, kappa, cfg.train.seed, shares[1], p.clip_quantile, p.clip_lr,
                     (p.clip_count_noise or p.noise_multiplier) if p.clip_quantile else 0.0), accountant

