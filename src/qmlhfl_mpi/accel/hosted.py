"""Any codec on torch vectors, through the host: the fallback for codecs with no device form.

:class:`HostedCodec` copies the difference ``child - parent`` (computed on the
device) to the host, encodes it there with the codec itself, and adds decoded
messages back on the device as ``acc += (a * decode(buf))``: the arithmetic of
:meth:`Codec.decode_add`, so the sums are the host's bit for bit.  It relies
on the :class:`~qmlhfl_mpi.core.codecs.Codec` contract that a message depends
on ``child - parent`` only.  Each message then moves ``d`` floats across the
host boundary (twice for a child whose parent is on the same rank), which is
why the backend logs the links that take this path.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.codecs import Codec, StreamKey

__all__ = ["HostedCodec"]


class HostedCodec:
    """``host`` (any :class:`Codec`) serving torch vectors on ``device``."""

    def __init__(self, host: Codec, device: torch.device) -> None:
        self.host, self.device = host, torch.device(device)
        self._zeros: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.host.name

    def nbytes(self, d: int) -> int:
        return self.host.nbytes(d)

    def through_host(self, d: int) -> bool:
        """Every message moves ``d`` floats between the device and the host."""
        return True

    def _diff(self, child: torch.Tensor, parent: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if child.shape != parent.shape:
            raise ValueError(f"child {tuple(child.shape)} and parent {tuple(parent.shape)} differ in shape")
        diff = (child.reshape(-1) - parent.reshape(-1)).cpu().numpy()
        if self._zeros is None or self._zeros.size != diff.size:
            self._zeros = np.zeros(diff.size, dtype=np.float32)
        return diff, self._zeros

    def encode(self, child: torch.Tensor, parent: torch.Tensor, key: StreamKey) -> np.ndarray:
        return self.host.encode(*self._diff(child, parent), key)

    def decode(self, buf: np.ndarray, d: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.host.decode(buf, d), dtype=np.float32)).to(self.device)

    def _add(self, dec: np.ndarray, a: np.float32, acc: torch.Tensor) -> None:
        acc += torch.from_numpy(np.asarray(dec, dtype=np.float32) * np.float32(a)).to(self.device)

    def decode_add(self, buf: np.ndarray, a: np.float32, acc: torch.Tensor) -> None:
        self._add(self.host.decode(buf, acc.numel()), a, acc)

    def encode_add(self, child: torch.Tensor, parent: torch.Tensor, key: StreamKey, a: np.float32,
                   acc: torch.Tensor) -> None:
        d = acc.numel()
        self._add(self.host.decode(self.host.encode(*self._diff(child, parent), key), d), a, acc)
