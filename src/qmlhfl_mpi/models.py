"""Models of the paper and FedAvg literature, with seeded, global-RNG-free init.

Modules are built on the ``meta`` device (no memory, no RNG draw), then
materialised and initialised from a private ``torch.Generator`` derived from
``seed``.  The same seed therefore gives bit-identical parameters on every
rank, whatever ``torch.manual_seed`` was called with, and building a model
never advances the global RNG.  No BatchNorm: local SGD and BN do not mix.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

MODEL_NAMES = ("logreg", "mlp", "cnn", "cifar-cnn", "linear")

_INIT_PURPOSE = 2  # = qmlhfl_mpi.rng.INIT: the init stream is keyed (seed, INIT)
_CNN_SHAPE = (1, 28, 28)
_CIFAR_SHAPE = (3, 32, 32)


def _mlp(in_features: int, hidden: int, num_classes: int) -> nn.Module:
    """FedAvg's "2NN": two hidden ReLU layers."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _cnn(num_classes: int) -> nn.Module:
    """FedAvg's MNIST CNN (McMahan et al. 2017): 1,663,370 parameters for 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def _cifar_cnn(num_classes: int) -> nn.Module:
    """The TensorFlow CIFAR-10 tutorial CNN: 3x3 valid convs 32/64/64, two
    max-pools, dense 64; 122,570 parameters for 10 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),   # 32 -> 30 -> 15
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),  # 15 -> 13 -> 6
        nn.Conv2d(64, 64, 3), nn.ReLU(),                   # 6 -> 4
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _init_parameters(model: nn.Module, seed: int) -> None:
    """Torch's default scheme, drawn from a private generator: weights and
    biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    state = np.random.SeedSequence([seed, _INIT_PURPOSE]).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state))
    covered = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.uniform_(-bound, bound, generator=gen)
                covered.add(id(module.weight))
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=gen)
                    covered.add(id(module.bias))
    missed = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missed:  # pragma: no cover - guards future model edits
        raise RuntimeError(f"parameters without a seeded initialiser: {missed}")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 200,
                seed: int = 0) -> nn.Module:
    """Build model ``name`` (one of :data:`MODEL_NAMES`) for inputs of
    ``input_shape`` (without the batch dimension), returning float32 logits
    ``(batch, num_classes)``.  Parameters depend only on ``seed``."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name={name!r}: unknown model; valid names are {MODEL_NAMES}")
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
        raise ValueError(f"input_shape={input_shape!r}: expected a non-empty tuple of positive integers")
    min_classes = 1 if name == "linear" else 2
    for arg, value, low in (("num_classes", num_classes, min_classes), ("hidden", hidden, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{arg}={value!r}: must be an integer >= {low}")
    needed = {"cnn": _CNN_SHAPE, "cifar-cnn": _CIFAR_SHAPE}.get(name)
    if needed is not None and shape != needed:
        raise ValueError(f"model {name!r} needs input_shape {needed}, got {shape}; "
                         f"use 'mlp' or 'logreg' for other shapes")
    in_features = int(np.prod(shape))
    with torch.device("meta"):  # no allocation and no global-RNG draw for torch's default init
        if name == "logreg":
            model: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
        elif name == "linear":  # least-squares regression: one output
            model = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 1))
        elif name == "mlp":
            model = _mlp(in_features, hidden, num_classes)
        elif name == "cnn":
            model = _cnn(num_classes)
        else:
            model = _cifar_cnn(num_classes)
    model = model.to_empty(device="cpu")
    _init_parameters(model, int(seed))
    return model


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (the length of the flat model vector)."""
    return sum(p.numel() for p in model.parameters())
