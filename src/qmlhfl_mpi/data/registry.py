"""The data-set registry (torch-free: built-ins are references imported on first use).

A data set is a function ``f(root, train, **data.args)`` returning ``(x, y)``
or ``(x, y, owner)``: ``x`` of shape ``(n, *input_shape)`` (numpy, torch, or
any array indexable by an integer array), ``y`` integer class labels or float
regression targets, ``owner`` the owner id of every training sample (for
``data.partition.kind: natural``).  The built-in generated data sets
(``synthetic``, ``lstsq``) are :class:`~qmlhfl_mpi.data.source.GeneratedDataset`
classes that make each device's data on the rank that hosts it.
"""
from __future__ import annotations

from ..core.registry import Registry

DATASETS = Registry("data set", "data.name")
DATASETS.register("synthetic", "qmlhfl_mpi.data.synthetic:Synthetic",
                  "embedded Synthetic(alpha, beta): non-IID softmax regression, generated per device")
DATASETS.register("lstsq", "qmlhfl_mpi.data.synthetic:LeastSquares",
                  "embedded least-squares regression, generated per device (for the theory checks)")
DATASETS.register("mnist", "qmlhfl_mpi.data.images:mnist", "MNIST from data.root")
DATASETS.register("fashion-mnist", "qmlhfl_mpi.data.images:fashion_mnist",
                  "Fashion-MNIST from data.root (Debian: /usr/share/datasets/fashion-mnist)")
DATASETS.register("cifar10", "qmlhfl_mpi.data.images:cifar10", "CIFAR-10 (python batches) from data.root")
DATASETS.register("arrow", "qmlhfl_mpi.data.arrow:arrow",
                  "Arrow/Parquet files under data.root (Hugging Face save_to_disk, DatasetDict, .parquet, .feather): "
                  "data.args path, features, label, owner")

# The built-in pooled data sets' sizes, known before they are loaded (for the memory estimate): training
# samples, test samples, input shape, classes; pixels are held as one byte each.
POOLED_SIZES: dict[str, tuple[int, int, tuple[int, ...], int]] = {
    "mnist": (60000, 10000, (1, 28, 28), 10),
    "fashion-mnist": (60000, 10000, (1, 28, 28), 10),
    "cifar10": (50000, 10000, (3, 32, 32), 10),
}
