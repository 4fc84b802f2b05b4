"""Aggregation policies (pure): which of an aggregation's children a node aggregates, and when it does.

A policy sees when each participant's message arrives (the virtual clock of :mod:`.clock`, seconds since the
round started, in child order) and the time the node sent its model; it returns the children it keeps, when the
aggregation ends and which child it waited for last (-1: it waited for a timer).  Children it does not keep are
*dropped*: timed, counted, never trained (docs/system.md).  Arrivals tie-break by child id (child order).

``aggregation.policy`` picks one per layer (cloud last): ``all`` (the paper's: wait for everyone),
``deadline`` (``aggregation.deadline`` seconds after sending the model, at least ``min_children``) and
``first_k`` (the first ``aggregation.k`` arrivals: over-selection, Bonawitz et al. 2019); a plug-in is a
class built with the same keyword arguments that has this ``select``.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .asynchrony import Staleness
from .registry import Registry

__all__ = ["POLICIES", "All", "Buffered", "Deadline", "FirstK", "Policy", "make_policy"]


class Policy(Protocol):
    name: str

    def select(self, arrive: np.ndarray, start: float) -> tuple[np.ndarray, float, int]:
        """``(kept mask, end time, index of the child waited for last or -1)`` for messages arriving at
        ``arrive`` (at least one) at a node that sent its model at ``start``."""


def _first(arrive: np.ndarray, m: int) -> tuple[np.ndarray, float, int]:
    """Keep the first ``m`` arrivals (ties by child order)."""
    order = np.argsort(arrive, kind="stable")[:m]
    keep = np.zeros(len(arrive), dtype=bool)
    keep[order] = True
    last = int(order[-1])
    return keep, float(arrive[last]), last


class All:
    """Wait for every participant (the paper's synchronous aggregation)."""

    name = "all"

    def __init__(self, **_: Any) -> None:
        pass

    def select(self, arrive: np.ndarray, start: float) -> tuple[np.ndarray, float, int]:
        last = int(np.argmax(arrive))
        return np.ones(len(arrive), dtype=bool), float(arrive[last]), last


class Deadline:
    """Keep the messages that arrive within ``deadline`` s of the node sending its model; if fewer than
    ``min_children`` do, wait for the first ``min_children``."""

    name = "deadline"

    def __init__(self, deadline: float = 0.0, min_children: int = 1, **_: Any) -> None:
        if not deadline > 0:
            raise ValueError(f"deadline = {deadline!r}: expected seconds > 0")
        if min_children < 0:
            raise ValueError(f"min_children = {min_children!r}: expected an integer >= 0")
        self.deadline, self.min_children = float(deadline), int(min_children)

    def select(self, arrive: np.ndarray, start: float) -> tuple[np.ndarray, float, int]:
        cut = start + self.deadline
        keep = arrive <= cut
        if keep.all():
            last = int(np.argmax(arrive))
            return keep, float(arrive[last]), last
        need = min(self.min_children, len(arrive))
        if int(keep.sum()) >= need:
            return keep, cut, -1
        return _first(arrive, need)


class FirstK:
    """Keep the first ``k`` arrivals (all of them when fewer take part)."""

    name = "first_k"

    def __init__(self, k: int = 1, **_: Any) -> None:
        if k < 1:
            raise ValueError(f"k = {k!r}: expected an integer >= 1")
        self.k = int(k)

    def select(self, arrive: np.ndarray, start: float) -> tuple[np.ndarray, float, int]:
        return _first(arrive, min(self.k, len(arrive)))


class Buffered:
    """A buffered (semi-asynchronous) layer (:mod:`.tiers`): it never waits for a set of children; each of
    its aggregations in the clock's sense has one child (a job), kept when it arrives."""

    name = "buffered"

    def __init__(self, buffer: int = 1, staleness: str = "constant", **_: Any) -> None:
        if buffer < 1:
            raise ValueError(f"buffer = {buffer!r}: expected an integer >= 1")
        self.buffer, self.staleness = int(buffer), Staleness(staleness)

    def select(self, arrive: np.ndarray, start: float) -> tuple[np.ndarray, float, int]:
        last = int(np.argmax(arrive))
        return np.ones(len(arrive), dtype=bool), float(arrive[last]), last


class SecureThreshold:
    """A secure aggregation group's abort rule around a layer's policy (docs/privacy.md): when fewer than
    ``threshold`` of the messages it keeps would be summed, the node takes none of them (the group aborts at the
    same time: its members' masks could not hide a lone survivor's update)."""

    def __init__(self, inner: Policy, threshold: int) -> None:
        self.inner, self.threshold = inner, int(threshold)
        self.name = getattr(inner, "name", "policy")

    def select(self, arrive: np.ndarray, start: float) -> tuple[np.ndarray, float, int]:
        kept, end, last = self.inner.select(arrive, start)
        if int(np.count_nonzero(kept)) < self.threshold:
            return np.zeros(len(arrive), dtype=bool), end, last
        return kept, end, last


POLICIES = Registry("aggregation policy", "aggregation.policy")
POLICIES.register("all", All, "wait for every participating child (the paper's)")
POLICIES.register("deadline", Deadline, "the children whose messages arrive within aggregation.deadline s of the "
                                        "node sending its model, at least aggregation.min_children")
POLICIES.register("first_k", FirstK, "the first aggregation.k arrivals (over-selection)")
POLICIES.register("buffered", Buffered, "layers m..N (a top segment): semi-asynchronous, an update every "
                                        "aggregation.buffer arrivals weighted by aggregation.staleness "
                                        "(docs/algorithms.md, \"Buffered layers\")")


def make_policy(name: str, **params: Any) -> Policy:
    """The policy ``name`` (or a plug-in reference) built with ``params``; raises ``ValueError`` or
    :class:`~.registry.PluginError`."""
    policy: Policy = POLICIES.resolve(name)(**params)
    return policy
