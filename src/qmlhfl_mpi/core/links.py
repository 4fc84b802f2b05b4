"""What happens on each link, resolved once from the config (pure).

Link ``n`` joins layer ``n-1`` to layer ``n``.  Its :class:`Link` holds the
uplink codec, whether the senders keep error-feedback residuals, the server
optimiser of the layer-``n`` nodes, and the downlink codec (``None``: the
parents send float32 models).  The defaults are the paper's algorithm:
averaging, no error feedback, float32 downlinks.  Built by
:func:`qmlhfl_mpi.config.build.links`, one per link, cloud last.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .codecs import Codec
from .server_opt import Average, ServerOptimizer

__all__ = ["Link"]


@dataclass(frozen=True)
class Link:
    """Link ``n``'s codecs, error feedback and its parents' server optimiser (see the module doc)."""

    codec: Codec
    error_feedback: bool = False
    server: ServerOptimizer = field(default_factory=Average)
    downlink: Codec | None = None

    @property
    def stateful(self) -> bool:
        """Whether the link keeps per-node vectors (residuals at the senders, server state at the parents)."""
        return self.error_feedback or not isinstance(self.server, Average)
