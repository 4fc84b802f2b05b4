"""The edge: runtime objects built from a :class:`~.schema.Config`, once.

Everything below this module (data, learning, communication, results, the
pure core) receives typed pieces (a tree, codecs, a data set, a model),
never the whole config.  Not collective: the session agrees on the errors
these raise.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from torch import nn

from ..core.codecs import Codec, link_codecs
from ..core.partition import partition
from ..core.theory import LatencyModel
from ..core.topology import Tree
from ..data.local import (
    LocalData,
    generated_local_data,
    num_classes_of,
    pooled_local_data,
)
from ..data.registry import DATASETS
from ..data.source import DataError, GeneratedDataset, Pooled, load_pooled
from ..learning.models import build_model
from .schema import Config

__all__ = ["codecs", "data_spec", "latency", "local_data", "model", "model_dim"]


def codecs(cfg: Config) -> list[Codec]:
    """One codec per link from ``quantizer.kind``, ``levels`` and ``bucket``."""
    q = cfg.quantizer
    return link_codecs(q.levels, q.bucket, q.kind)


def latency(cfg: Config) -> LatencyModel:
    """The deadline model's per-step time and per-link rates and latencies."""
    return LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())


def _dataset(cfg: Config) -> Any:
    return DATASETS.resolve(cfg.data.name)


def _generated(cfg: Config, obj: Any) -> GeneratedDataset:
    """A generated data set gets the run seed, the ``data.synthetic`` section and ``data.args``."""
    try:
        return obj(cfg.train.seed, **{**dataclasses.asdict(cfg.data.synthetic), **cfg.data.args})
    except TypeError as e:
        raise DataError(f"data set {cfg.data.name!r} with data.args={cfg.data.args!r}: {e}") from None


def _is_generated(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, GeneratedDataset)


def _pooled(cfg: Config, obj: Any, train: bool) -> Pooled:
    if not callable(obj):
        raise DataError(f"data set {cfg.data.name!r}: {obj!r} is not callable; a data-set plug-in is a function "
                        "f(root, train, **data.args) returning (x, y) or (x, y, owner)")
    args = dict(cfg.data.args)
    if cfg.data.download:
        args["download"] = True
    return load_pooled(obj, cfg.data.name, cfg.data.root, train, args)


def local_data(cfg: Config, tree: Tree, devices: range, rank: int, num_ranks: int) -> LocalData:
    """The data of the devices ``devices`` that ``rank`` of ``num_ranks`` hosts."""
    obj = _dataset(cfg)
    if _is_generated(obj):
        return generated_local_data(_generated(cfg, obj), tree.num_devices, devices)
    train = _pooled(cfg, obj, True)
    test = _pooled(cfg, obj, False)
    if test.input_shape != train.input_shape:
        raise DataError(f"data set {cfg.data.name!r}: test samples have shape {test.input_shape} but training "
                        f"samples {train.input_shape}")
    if test.regression != train.regression:
        raise DataError(f"data set {cfg.data.name!r}: the training split has {train.y.dtype} targets and the "
                        f"test split {test.y.dtype}; both must be class labels or both regression targets")
    p = cfg.data.partition
    labels = np.zeros(len(train), dtype=np.int64) if train.regression else train.y  # targets: no label skew
    try:
        parts = partition(labels, tree.num_devices, p.kind, cfg.train.seed, classes_per_device=p.classes_per_device,
                          alpha=p.alpha, size_sigma=p.size_sigma, classes_per_edge=p.classes_per_edge,
                          groups=[tree.device_range(1, u) for u in range(tree.num_nodes(1))], owners=train.owner)
    except ValueError as e:
        raise DataError(f"data.partition.kind {p.kind!r} on data set {cfg.data.name!r} "
                        f"({len(train)} training samples, {tree.num_devices} devices): {e}") from None
    return pooled_local_data(train, test, parts, devices, rank, num_ranks)


def data_spec(cfg: Config) -> tuple[tuple[int, ...], int]:
    """(input shape, outputs) of the configured data set; a pooled data set's test split is loaded for it."""
    obj = _dataset(cfg)
    if _is_generated(obj):
        ds = _generated(cfg, obj)
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
    return sum(p.numel() for p in model(cfg, shape, classes).parameters())
