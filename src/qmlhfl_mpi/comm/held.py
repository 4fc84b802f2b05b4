"""A buffered cloud's messages on the cloud's leader (docs/algorithms.md, "Buffered cloud"): each busy child's
message, made when its job started and in the cloud's hands when it arrives, and the buffer of arrived ones in
arrival order (a fast child may be in it twice).  Not collective; the executor moves the bytes."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["HeldMessages"]


class HeldMessages:
    """The messages in flight (:attr:`held`, by child) and the buffer; their checkpoint form: ``held.N.<child>.<k>``
    float32 vectors of ``dim`` values holding the bytes (zero-padded)."""

    def __init__(self, dim: int, msg_len: int, N: int) -> None:
        self.dim, self.msg_len, self.N = dim, msg_len, N
        self.slots = 0  # the float32 vectors the held messages may take in a checkpoint (set by the runtime)
        self.held: dict[int, np.ndarray] = {}
        self.buffer: list[tuple[int, np.ndarray]] = []

    def keep(self, child: int, msg: np.ndarray) -> None:
        self.held[child] = np.array(msg, dtype=np.uint8)

    def arrive(self, child: int) -> None:
        self.buffer.append((child, self.held.pop(child)))

    def take(self, children: Sequence[int]) -> list[np.ndarray]:
        """The buffer's messages (emptied), which must be those of ``children`` in that order."""
        got, self.buffer = self.buffer, []
        if [c for c, _ in got] != list(children):
            raise RuntimeError(f"the buffer holds children {[c for c, _ in got]} but the update expects "
                               f"{list(children)}")
        return [m for _, m in got]

    def state(self) -> dict[str, np.ndarray]:
        """The checkpoint entries of the messages in flight (the buffer is empty at a round's end)."""
        out = {}
        for c, msg in self.held.items():
            raw = np.asarray(msg, dtype=np.uint8)
            parts = max(1, -(-raw.size // (4 * self.dim)))
            padded = np.zeros(parts * 4 * self.dim, dtype=np.uint8)
            padded[: raw.size] = raw
            for k, part in enumerate(padded.view(np.float32).reshape(parts, self.dim)):
                out[f"held.{self.N}.{c}.{k}"] = part.copy()
        return out

    def load(self, entries: Mapping[str, np.ndarray]) -> None:
        """Take over the ``held.*`` entries of :meth:`state` (after a resume)."""
        pieces: dict[int, list[tuple[int, np.ndarray]]] = {}
        for name, x in entries.items():
            child, k = (int(i) for i in name.split(".")[2:4])
            pieces.setdefault(child, []).append((k, np.asarray(x, dtype=np.float32).reshape(-1)))
        for child, parts in pieces.items():
            joined = np.concatenate([p for _, p in sorted(parts, key=lambda kp: kp[0])])
            self.held[child] = joined.view(np.uint8)[: self.msg_len].copy()
