"""The model registry (torch-free: built-ins are references imported on first use).

A model is a function ``f(input_shape, num_classes, **model.args) -> torch.nn.Module``
whose forward maps a batch ``(b, *input_shape)`` to ``(b, num_classes)``
(``num_classes`` is 1 for regression targets).
"""
from __future__ import annotations

from ..core.registry import Registry

MODELS = Registry("model", "model.name")
MODELS.register("logreg", "qmlhfl_mpi.learning.models:logreg", "softmax (or linear) regression")
MODELS.register("linear", "qmlhfl_mpi.learning.models:logreg",
                "the same linear map; the name used with the least-squares data lstsq")
MODELS.register("mlp", "qmlhfl_mpi.learning.models:mlp", "FedAvg's 2NN: two hidden ReLU layers of args.hidden")
MODELS.register("cnn", "qmlhfl_mpi.learning.models:cnn", "FedAvg's MNIST CNN, 1x28x28 inputs (1,663,370 parameters)")
MODELS.register("cifar-cnn", "qmlhfl_mpi.learning.models:cifar_cnn", "TensorFlow tutorial CNN, 3x32x32 inputs")
