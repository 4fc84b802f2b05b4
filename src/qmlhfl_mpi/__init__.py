"""qmlhfl_mpi: multi-layer hierarchical federated learning with layer-specific
quantization (QMLHFL) on MPI.

The public API (docs/api.md)::

    cfg = qmlhfl_mpi.load_config("configs/quickstart.yaml", ["train.rounds=5"])
    summary = qmlhfl_mpi.Session(cfg).run([qmlhfl_mpi.ConsoleTable()])   # collective

``Session(cfg, comm=None)`` builds a run on a communicator (default: the
world communicator); ``Callback`` is the base class of callbacks; ``MODELS``,
``DATASETS``, ``PARTITIONERS`` and ``CODECS`` are the registries of the
extension points.  Names are imported on first use, so ``import qmlhfl_mpi``
initialises neither MPI nor torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_EXPORTS = {
    "load_config": "qmlhfl_mpi.config",
    "Config": "qmlhfl_mpi.config",
    "ConfigError": "qmlhfl_mpi.config",
    "Session": "qmlhfl_mpi.run.session",
    "RunSummary": "qmlhfl_mpi.run.callbacks",
    "RunError": "qmlhfl_mpi.run.errors",
    "Callback": "qmlhfl_mpi.run.callbacks",
    "ConsoleTable": "qmlhfl_mpi.run.console",
    "SignalStop": "qmlhfl_mpi.run.signals",
    "CSVLog": "qmlhfl_mpi.run.logs",
    "TensorBoardLog": "qmlhfl_mpi.run.logs",
    "PluginError": "qmlhfl_mpi.core.registry",
    "MODELS": "qmlhfl_mpi.learning.registry",
    "DATASETS": "qmlhfl_mpi.data.registry",
    "PARTITIONERS": "qmlhfl_mpi.core.partition",
    "CODECS": "qmlhfl_mpi.core.codecs",
    "Codec": "qmlhfl_mpi.core.codecs",
}

__all__ = ["CODECS", "CSVLog", "Callback", "Codec", "Config", "ConfigError", "ConsoleTable", "DATASETS", "MODELS",
           "PARTITIONERS", "PluginError", "RunError", "RunSummary", "Session", "SignalStop", "TensorBoardLog",
           "__version__", "load_config"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qmlhfl_mpi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
