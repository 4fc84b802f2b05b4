"""A model plug-in: a small residual MLP with a LayerNorm.

Use it in a config as::

    model:
      name: examples/custom_model.py:build   # path relative to the directory you run from
      args: {width: 32}

A model plug-in is a function ``f(input_shape, num_classes, **model.args)``
returning a ``torch.nn.Module`` whose forward maps a float32 batch of shape
``(batch, *input_shape)`` to logits of shape ``(batch, num_classes)``.  The
engine checks the module (float32 parameters, output shape, no buffers that
training changes, so no BatchNorm) and, with the default ``model.init:
seeded``, redraws every parameter from ``train.seed``: the init below is
therefore irrelevant, and every rank gets the same model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_WIDTH = 32  # a module-level constant (not callable: the tests point a reference at it)


class ResidualMLP(nn.Module):
    """flatten -> Linear(width) -> ReLU -> [h + ReLU(Linear(LayerNorm(h)))] -> Linear(num_classes)."""

    def __init__(self, in_features: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.inp = nn.Linear(in_features, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(self.flatten(x)))
        h = h + torch.relu(self.hidden(self.norm(h)))  # the residual block
        return self.out(h)


def build(input_shape: Sequence[int], num_classes: int, width: int = DEFAULT_WIDTH) -> nn.Module:
    """The residual MLP for inputs of ``input_shape`` (any shape; flattened) and ``num_classes`` outputs.

    A ``ValueError`` (or ``TypeError``) raised here reaches the user as a clean
    error that names the plug-in and its arguments."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width={width!r}: must be an integer >= 1")
    return ResidualMLP(math.prod(int(d) for d in input_shape), int(num_classes), width)
