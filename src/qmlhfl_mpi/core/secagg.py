"""Secure aggregation inside an aggregation group (Bonawitz et al., CCS 2017), pure: pairwise masks that cancel
in the group's sum mod ``2^b``, from real X25519 key agreement (docs/privacy.md).

Every child ``c`` of a group (the children of one aggregation that started it) has a key pair for that
aggregation; its private key is 32 bytes of the stream ``(seed, SECAGG, layer, node, round, call, c)`` (so every
rank derives the same keys: the exchange itself is simulated, its bytes counted).  Two children ``i < j`` (by
place in the group) agree on ``X25519(priv_i, pub_j)``; SHA-256 of it seeds the PCG64 stream of their mask
``m_ij``, ``d'`` uniform integers mod ``2^b``.  Child ``i`` sends ``codes_i + sum_{j > i} m_ij - sum_{j < i} m_ji``
mod ``2^b``: uniform on its own, the masks cancel in the sum.

**Dropouts** (SecAgg+, Bell et al. 2020): a child that started but whose message the parent does not take (a
deadline, ``first_k``) leaves its masks in the survivors' messages.  Each survivor reveals the seed it shares
with each dropped child (32 bytes up each) and the parent removes those masks: the sum of the survivors' codes,
exactly.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import rng

__all__ = ["KEY_BYTES", "Group", "recovery_bytes"]

KEY_BYTES = 32  # an X25519 public key, and a revealed shared seed


class Group:
    """The key group of one aggregation: ``members`` (child ids in order), keys from ``(seed, layer, node,
    round, call)``; masks of ``length`` integers mod ``2^bits``."""

    def __init__(self, members: Sequence[int], key: Sequence[int], length: int, bits: int) -> None:
        self.members = [int(c) for c in members]
        self.key, self.length, self.modulus = tuple(int(k) for k in key), int(length), 1 << int(bits)
        self._private: dict[int, X25519PrivateKey] = {}

    def private(self, c: int) -> X25519PrivateKey:
        if c not in self._private:
            raw = rng.generator((*self.key[:1], rng.SECAGG, *self.key[1:], c)).bytes(32)
            self._private[c] = X25519PrivateKey.from_private_bytes(raw)
        return self._private[c]

    def public(self, c: int) -> bytes:
        """Child ``c``'s public key (the 32 bytes it sends its parent, which forwards them to the group)."""
        return self.private(c).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def pair_mask(self, i: int, j: int) -> np.ndarray:
        """The mask children ``i`` and ``j`` agree on (uint64 in ``[0, 2^b)``), from ``i``'s private key and
        ``j``'s public key (the same from ``j``'s side)."""
        shared = self.private(i).exchange(X25519PublicKey.from_public_bytes(self.public(j)))
        seed = int.from_bytes(hashlib.sha256(shared + b"qmlhfl-mask").digest()[:16], "little")
        gen = np.random.Generator(np.random.PCG64(seed))
        return gen.integers(0, self.modulus, size=self.length, dtype=np.uint64)

    def mask(self, c: int) -> np.ndarray:
        """What child ``c`` adds to its codes: ``sum_{j after c} m_cj - sum_{j before c} m_jc`` mod ``2^b``."""
        pos = self.members.index(c)
        out = np.zeros(self.length, dtype=np.uint64)
        for k, j in enumerate(self.members):
            if k == pos:
                continue
            if k > pos:  # uint64 arithmetic wraps mod 2^64, of which 2^b is a divisor
                out += self.pair_mask(c, j)
            else:
                out -= self.pair_mask(c, j)
        return self._wrap(out)

    def _wrap(self, x: np.ndarray) -> np.ndarray:
        return np.bitwise_and(x, np.uint64(self.modulus - 1))

    def masked(self, c: int, codes: np.ndarray) -> np.ndarray:
        return self._wrap(np.asarray(codes, dtype=np.uint64) + self.mask(c))

    def unmask_dropped(self, total: np.ndarray, kept: Sequence[int]) -> np.ndarray:
        """The sum of the ``kept`` children's masked codes with the masks they share with the dropped members
        removed (each survivor revealed those seeds): the sum of their codes mod ``2^b``."""
        kept_set = {int(c) for c in kept}
        dropped = [j for j in self.members if j not in kept_set]
        out = np.asarray(total, dtype=np.uint64).copy()
        for i in sorted(kept_set):
            pi = self.members.index(i)
            for j in dropped:  # i added +m_ij if it comes first, -m_ij otherwise: take it back
                if pi < self.members.index(j):
                    out -= self.pair_mask(i, j)
                else:
                    out += self.pair_mask(i, j)
        return self._wrap(out)


def recovery_bytes(group: int, kept: int) -> tuple[int, int]:
    """``(up, down)`` bytes of a group's key exchange and dropout recovery: every member's public key up, the
    others' keys down to each member, and one revealed seed up per survivor and dropped member."""
    up = KEY_BYTES * group + KEY_BYTES * kept * (group - kept)
    down = KEY_BYTES * group * (group - 1)
    return up, down
