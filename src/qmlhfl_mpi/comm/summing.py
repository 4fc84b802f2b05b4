"""A link whose parents add integer codes (``intsum``; docs/privacy.md): the codes of every child, masked when
the layer runs secure aggregation, their sum on the parent's leader (exact: the same in any order and on any
number of ranks), the dropped members' masks removed, and the sum read back as the float32 weighted sum of the
updates.  Not collective: the executor moves the bytes."""
from __future__ import annotations

import numpy as np

from ..core import rng
from ..core.codecs.intsum import IntSumCodec
from ..core.plan import Aggregation, RoundPlan
from ..core.privacy import Mechanism
from ..core.secagg import Group, recovery_bytes

__all__ = ["SummedLink"]


class SummedLink:
    """Link ``n``'s ``intsum`` codec over models of ``dim`` values; ``secure``: its parents learn only sums."""

    def __init__(self, n: int, codec: IntSumCodec, dim: int, secure: bool, shares: Mechanism | None = None) -> None:
        self.n, self.codec, self.dim, self.secure = n, codec, dim, secure
        self.shares = shares  # distributed DP: every child adds its discrete Gaussian share to its codes
        self._sums: dict[int, np.ndarray] = {}      # by parent node, on its leader
        self._groups: dict[int, Group] = {}         # by parent node, where its children are made (replaced at the
                                                    # node's next aggregation)

    def _rotation(self, plan: RoundPlan, a: Aggregation) -> tuple[int, ...]:
        return (plan.seed, rng.ROTATE, a.layer, a.node, plan.round, a.call)

    def open(self, plan: RoundPlan, a: Aggregation, leads: bool) -> None:
        """Aggregation ``a`` starts: its key group (every rank making a child's codes) and, on its leader, the
        sum."""
        if self.secure:
            members = a.group if a.group is not None else a.children
            self._groups[a.node] = Group(members.tolist(), (plan.seed, a.layer, a.node, plan.round, a.call),
                                         self.codec.length(self.dim), self.codec.bits)
        if leads:
            self._sums[a.node] = np.zeros(self.codec.length(self.dim), dtype=np.uint64)

    def add(self, plan: RoundPlan, a: Aggregation, j: int, update: np.ndarray, leads: bool) -> np.ndarray | None:
        """Participant ``j``'s codes of its (clipped) ``update``: added to the sum on the parent's leader, else
        returned as its message."""
        c = int(a.children[j])
        codes = self.codec.codes(update, float(a.weights[j]), plan.message_key(a, j), self._rotation(plan, a))
        mech = self.shares
        if mech is not None:  # keyed like a device's local noise: (0, device, round, training call)
            size = codes.size
            std = mech.share_std(float(np.max(a.weights)), self.codec.scale, size)
            noise = mech.discrete_noise(size, (0, c, plan.round, int(a.train_calls[j])), std)
            codes = np.mod(codes.astype(np.int64) + noise, self.codec.modulus).astype(np.uint64)
        if self.secure:
            codes = self._groups[a.node].masked(c, codes)
        if leads:
            self._sums[a.node] += codes
            return None
        return self.codec.pack(codes)

    def add_message(self, a: Aggregation, msg: np.ndarray) -> None:
        """A participant's message from another rank, on the parent's leader."""
        self._sums[a.node] += self.codec.unpack(msg, self.dim)

    def close(self, plan: RoundPlan, a: Aggregation) -> tuple[np.ndarray, int]:
        """On the parent's leader: the weighted sum of the participants' updates (float32) and the bytes of the
        key exchange and dropout recovery (0 without secure aggregation)."""
        total = self._sums.pop(a.node)
        extra = 0
        group = self._groups.pop(a.node, None)
        if group is not None:
            total = group.unmask_dropped(total, a.children.tolist())
            up, down = recovery_bytes(len(group.members), len(a.children))
            extra = up + down
        return self.codec.decode_sum(total, self.dim, self._rotation(plan, a)), extra
