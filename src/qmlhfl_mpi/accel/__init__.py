"""The aggregation's arithmetic on the training device: torch vectors and codecs (not collective).

With ``train.aggregate_on: device`` (the default ``auto`` picks it when the
ranks train on a GPU) the executor's model vectors, accumulators,
error-feedback residuals and server-optimiser state are torch tensors on the
training device (:class:`~.vectors.TorchVectors`), and the link codecs run
there: QSGD (:mod:`.qsgd`) and float32 (:mod:`.identity`) natively, byte for
byte and bit for bit what the host kernels compute; any other codec through
the host (:mod:`.hosted`).  Only packed messages cross to the host for MPI.
"""
from __future__ import annotations

from .vectors import DEVICE_CODECS, TorchVectors

__all__ = ["DEVICE_CODECS", "TorchVectors"]
