"""Buffered (semi-asynchronous) aggregation: the staleness functions, a buffer's weights and the grouping of
events into rounds (pure); the schedule of buffered layers is :mod:`.tiers`.

A buffered node never waits for a set of children: it buffers what arrives and, every ``k`` arrivals, applies
its server optimiser to

    g = sum_{i in buffer} (D(c_i) / sum_{buffer} D) * s(V - v_i) * decode(m_i)      (float32, in buffer order)

with ``V`` its version (how many times its model has changed) and ``v_i`` the version child ``c_i``'s work
started from.  (FedBuff, Nguyen et al. 2022; the staleness functions of FedAsync, Xie et al. 2019:
``constant``, ``polynomial(a)``: ``(1 + s)^-a``, ``hinge(a, b)``: 1 for ``s <= b``, else
``1 / (a (s - b) + 1)``.)
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np

__all__ = ["Staleness", "buffer_weights", "by_round"]


class Staleness:
    """A staleness function ``s(versions behind)`` from its text: ``constant``, ``polynomial(a)`` (a >= 0) or
    ``hinge(a, b)`` (a >= 0, b >= 0)."""

    FORMS = ("constant", "polynomial(a)", "hinge(a, b)")

    def __init__(self, text: str) -> None:
        self.text = str(text).strip()
        m = re.fullmatch(r"(constant|polynomial|hinge)(?:\((.*)\))?", self.text.replace(" ", ""))
        bad = ValueError(f"staleness {text!r}: expected one of {', '.join(self.FORMS)} (numbers >= 0), e.g. "
                         "polynomial(0.5)")
        if m is None:
            raise bad
        self.kind = m.group(1)
        try:
            args = tuple(float(x) for x in m.group(2).split(",")) if m.group(2) else ()
        except ValueError:
            raise bad from None
        if len(args) != {"constant": 0, "polynomial": 1, "hinge": 2}[self.kind] or \
                not all(math.isfinite(a) and a >= 0 for a in args):
            raise bad
        self.args = args

    def __call__(self, behind: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + behind) ** -self.args[0])
        a, b = self.args
        return 1.0 if behind <= b else 1.0 / (a * (behind - b) + 1.0)


def buffer_weights(sizes: np.ndarray, buffer: Sequence[tuple[int, int]], version: int,
                   staleness: Staleness) -> tuple[tuple[int, np.float32], ...]:
    """``(child, weight)`` of an update from ``buffer`` (``(child, version its job started from)``, in order) at
    version ``version``: the child's share of the buffer's sizes times ``s(versions behind)``, in float32."""
    got = np.array([sizes[c] for c, _ in buffer])
    share = got / got.sum() if got.sum() > 0 else np.zeros(len(buffer))
    return tuple((c, np.float32(share[i] * staleness(version - v))) for i, (c, v) in enumerate(buffer))


class _RoundEvent(Protocol):
    @property
    def round_end(self) -> bool: ...


E = TypeVar("E", bound=_RoundEvent)


def by_round(events: Iterable[E]) -> Iterator[list[E]]:
    """``events`` grouped by round: each list ends with an event whose ``round_end`` is set."""
    out: list[E] = []
    for e in events:
        out.append(e)
        if e.round_end:
            yield out
            out = []
