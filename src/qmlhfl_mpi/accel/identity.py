"""``none`` (float32 messages) on torch tensors: the difference's bytes are the message."""
from __future__ import annotations

import numpy as np
import torch

from ..core.codecs import StreamKey
from ..core.codecs.identity import IdentityCodec

__all__ = ["TorchIdentity"]


class TorchIdentity:
    """:class:`IdentityCodec` on torch vectors: ``child - parent`` is computed on the device and its
    ``4 d`` bytes (the message) are all that comes to the host; local children never leave it."""

    def __init__(self, host: IdentityCodec, device: torch.device) -> None:
        self.host, self.device = host, torch.device(device)

    @property
    def name(self) -> str:
        return self.host.name

    def nbytes(self, d: int) -> int:
        return self.host.nbytes(d)

    def encode(self, child: torch.Tensor, parent: torch.Tensor, key: StreamKey) -> np.ndarray:
        diff = child.reshape(-1) - parent.reshape(-1)
        return diff.cpu().numpy().astype("<f4", copy=False).view(np.uint8).reshape(-1)  # a fresh array

    def decode(self, buf: np.ndarray, d: int) -> torch.Tensor:
        return torch.from_numpy(self.host.decode(buf, d)).to(self.device)

    def decode_add(self, buf: np.ndarray, a: np.float32, acc: torch.Tensor) -> None:
        acc += self.decode(buf, acc.numel()) * float(np.float32(a))

    def encode_add(self, child: torch.Tensor, parent: torch.Tensor, key: StreamKey, a: np.float32,
                   acc: torch.Tensor) -> None:
        acc += (child.reshape(-1) - parent.reshape(-1)) * float(np.float32(a))
