"""What the layers do beyond plain averaging: the aggregator's options, built at the edge (pure)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .codecs import Codec
from .participation import Participation
from .server_opt import ServerOptimizer

__all__ = ["LinkOptions"]


@dataclass(frozen=True)
class LinkOptions:
    """What a layer does beyond plain averaging (the defaults are the paper's algorithm)."""

    participation: Participation | None = None                  # None: every child, every time
    server: Sequence[ServerOptimizer] = ()                      # per layer; empty: avg everywhere
    error_feedback: Sequence[bool] = ()                         # per link; empty: off
    downlink: Sequence[Codec | None] = ()                       # per link; None/empty: float32
