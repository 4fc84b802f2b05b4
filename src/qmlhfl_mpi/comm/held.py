"""The buffered layers' messages (docs/algorithms.md, "Buffered layers"), each on the leader of the node it is
sent to: the messages in flight (made when a job started, or when a node sent its delta up; in the node's
hands when they arrive) and each node's buffer of arrived ones in arrival order (a fast child may be in it
twice).  Not collective; the executor moves the bytes."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["HeldMessages"]


class HeldMessages:
    """The messages in flight (:attr:`held`, by ``(layer, child)``: to a node of ``layer`` from its child, a node
    of ``layer - 1``) and the buffers (by ``(layer, node)``: ``(child, message)`` in arrival order).

    Checkpoint form: ``held.<n>.<c>.<k>`` and ``buffer.<n>.<u>.<i>.<c>.<k>`` (``i``: the place in the buffer),
    float32 vectors of ``dim`` values holding the bytes (zero-padded); ``msg_len[n-1]`` is a link-``n``
    message's length."""

    def __init__(self, dim: int, msg_len: Sequence[int]) -> None:
        self.dim, self.msg_len = dim, tuple(msg_len)
        self.slots = 0  # the float32 vectors these may take in a checkpoint (set by the runtime)
        self.held: dict[tuple[int, int], np.ndarray] = {}
        self.buffers: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}

    def parts(self, n: int) -> int:
        """How many checkpoint vectors one link-``n`` message takes."""
        return max(1, -(-self.msg_len[n - 1] // (4 * self.dim)))

    def keep(self, n: int, child: int, msg: np.ndarray) -> None:
        self.held[(n, child)] = np.array(msg, dtype=np.uint8)

    def arrive(self, n: int, u: int, child: int) -> None:
        """The message in flight from ``child`` reaches node ``u`` of layer ``n``: into its buffer."""
        self.buffers.setdefault((n, u), []).append((child, self.held.pop((n, child))))

    def take(self, n: int, u: int, children: Sequence[int]) -> list[np.ndarray]:
        """The first ``len(children)`` messages of node ``u``'s buffer (removed), which must be those of
        ``children`` in that order."""
        buf = self.buffers.get((n, u), [])
        got, self.buffers[(n, u)] = buf[: len(children)], buf[len(children):]
        if [c for c, _ in got] != list(children):
            raise RuntimeError(f"layer {n} node {u}'s buffer holds children {[c for c, _ in buf]} but the update "
                               f"expects {list(children)} first")
        return [m for _, m in got]

    def _pack(self, n: int, msg: np.ndarray) -> list[np.ndarray]:
        raw = np.asarray(msg, dtype=np.uint8)
        padded = np.zeros(self.parts(n) * 4 * self.dim, dtype=np.uint8)
        padded[: raw.size] = raw
        return [p.copy() for p in padded.view(np.float32).reshape(-1, self.dim)]

    def state(self) -> dict[str, np.ndarray]:
        """The checkpoint entries of the messages in flight and in the buffers."""
        out = {}
        for (n, c), msg in self.held.items():
            for k, part in enumerate(self._pack(n, msg)):
                out[f"held.{n}.{c}.{k}"] = part
        for (n, u), buf in self.buffers.items():
            for i, (c, msg) in enumerate(buf):
                for k, part in enumerate(self._pack(n, msg)):
                    out[f"buffer.{n}.{u}.{i}.{c}.{k}"] = part
        return out

    def load(self, entries: Mapping[str, np.ndarray]) -> None:
        """Take over the ``held.*`` and ``buffer.*`` entries of :meth:`state` (after a resume)."""
        pieces: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for name, x in entries.items():
            ids = tuple(int(i) for i in name.split(".")[1:])
            pieces.setdefault(ids[:-1], []).append((ids[-1], np.asarray(x, dtype=np.float32).reshape(-1)))
        buffered: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = {}
        for ids, parts in pieces.items():
            n = ids[0]
            msg = np.concatenate([p for _, p in sorted(parts, key=lambda kp: kp[0])]).view(np.uint8)
            msg = msg[: self.msg_len[n - 1]].copy()
            if len(ids) == 2:
                self.held[(n, ids[1])] = msg
            else:
                buffered.setdefault((n, ids[1]), []).append((ids[2], ids[3], msg))
        for key, rows in buffered.items():
            self.buffers[key] = [(c, m) for _, c, m in sorted(rows, key=lambda r: r[0])]
