"""Torch model vectors on one device, and the device forms of the link codecs (not collective).

:data:`DEVICE_CODECS` maps a codec class to the factory of its device form,
``f(codec, device) -> LinkCodec``, by exact class (a subclass may change what
a codec computes: ``round`` subclasses ``qsgd``); a codec whose class is not
registered runs through the host (:class:`~.hosted.HostedCodec`).  To give a
plug-in codec a device form, register its class here the same way.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..core.codecs import Codec
from ..core.codecs.identity import IdentityCodec
from ..core.codecs.qsgd import QSGDCodec
from ..core.vectors import LinkCodec
from .hosted import HostedCodec
from .identity import TorchIdentity
from .qsgd import TorchQSGD

__all__ = ["DEVICE_CODECS", "TorchVectors"]

# codec class -> f(codec of that class, device) -> its device form
DEVICE_CODECS: dict[type, Callable[..., LinkCodec]] = {QSGDCodec: TorchQSGD, IdentityCodec: TorchIdentity}


class TorchVectors:
    """Float32 vectors as torch tensors on ``device``."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    @property
    def name(self) -> str:
        return f"torch:{self.device}"

    def zeros(self, d: int) -> torch.Tensor:
        return torch.zeros(d, dtype=torch.float32, device=self.device)

    def from_host(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, copy=True)

    def to_host(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().to("cpu", copy=True).numpy()

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def link_codec(self, codec: Codec) -> LinkCodec:
        """The device form of ``codec`` (:data:`DEVICE_CODECS`), or the host path when it has none."""
        factory = DEVICE_CODECS.get(type(codec))
        return HostedCodec(codec, self.device) if factory is None else factory(codec, self.device)
