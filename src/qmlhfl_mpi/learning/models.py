"""Built-in models, and building any model (built-in or plug-in) with a seeded init.

:func:`build_model` resolves ``model.name`` in :data:`~.registry.MODELS` (or as
a plug-in reference), calls the factory ``f(input_shape, num_classes, **args)``,
checks the module it returns (float32 parameters, output of shape
``(batch, num_classes)``, no buffers that training changes) and, with
``init="seeded"`` (the default), draws every parameter from a private
``torch.Generator`` derived from ``seed``.  The same seed therefore gives
bit-identical parameters on every rank, whatever the factory's own init
does, and building a model leaves the global RNG as it was.  With
``init="module"`` the factory's own values are kept (the session then
broadcasts rank 0's model to all ranks).  No BatchNorm in the built-ins:
local SGD and running statistics do not mix.

Seeded init: a parameter with two or more dimensions is drawn from
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = numel / shape[0]``
(torch's default bound for ``Linear`` and ``Conv``); a vector of a
normalisation layer is set to 1 (weight) or 0 (bias); any other vector (a
bias) from ``U(+-1/sqrt(fan_in))`` of its module's weight, or of its own
length where the module has no matrix weight.  Parameters are visited in
``model.modules()`` order, each module's own parameters in registration order.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.registry import PluginError
from .registry import MODELS

_INIT_PURPOSE = 2  # = qmlhfl_mpi.core.rng.INIT: the init stream is keyed (seed, INIT)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _in_features(input_shape: Sequence[int]) -> int:
    return int(np.prod(input_shape))


def logreg(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A linear map of the flattened input: softmax regression, or least squares with one output."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_in_features(input_shape), num_classes))


def mlp(input_shape: Sequence[int], num_classes: int, hidden: int = 64) -> nn.Module:
    """FedAvg's "2NN": two hidden ReLU layers of ``hidden`` units."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"model.args.hidden={hidden!r}: must be an integer >= 1")
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_in_features(input_shape), hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _needs(name: str, input_shape: Sequence[int], shape: tuple[int, ...]) -> None:
    if tuple(input_shape) != shape:
        raise ValueError(f"model {name!r} needs input_shape {shape}, got {tuple(input_shape)}; "
                         "use 'mlp' or 'logreg' for other shapes")


def cnn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """FedAvg's MNIST CNN (McMahan et al. 2017): 1,663,370 parameters for 10 classes."""
    _needs("cnn", input_shape, (1, 28, 28))
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def cifar_cnn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The TensorFlow CIFAR-10 tutorial CNN: 3x3 valid convs 32/64/64, two
    max-pools, dense 64; 122,570 parameters for 10 classes."""
    _needs("cifar-cnn", input_shape, (3, 32, 32))
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),   # 32 -> 30 -> 15
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),  # 15 -> 13 -> 6
        nn.Conv2d(64, 64, 3), nn.ReLU(),                   # 6 -> 4
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def seeded_init(model: nn.Module, seed: int) -> None:
    """Draw every parameter of ``model`` from a generator keyed ``(seed, INIT)`` (module docstring)."""
    state = np.random.SeedSequence([seed, _INIT_PURPOSE]).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state))
    with torch.no_grad():
        for module in model.modules():
            own = dict(module.named_parameters(recurse=False))
            weight = own.get("weight")
            fan_in = weight[0].numel() if weight is not None and weight.dim() >= 2 else None
            for pname, p in own.items():
                if isinstance(module, _NORMS) and p.dim() <= 1:
                    p.fill_(1.0 if pname == "weight" else 0.0)
                    continue
                fi = p[0].numel() if p.dim() >= 2 else (fan_in or max(p.numel(), 1))
                bound = 1.0 / math.sqrt(fi)
                p.uniform_(-bound, bound, generator=gen)


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (the length of the flat model vector)."""
    return sum(p.numel() for p in model.parameters())


def _keyword_parameters(fn: Any) -> list[str]:
    """The parameters after ``(input_shape, num_classes)`` a model function accepts."""
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _call_factory(name: str, input_shape: tuple[int, ...], num_classes: int, args: dict[str, Any]) -> nn.Module:
    factory = MODELS.resolve(name)
    if not callable(factory):
        raise PluginError(f"model {name!r}: {factory!r} is not callable; a model plug-in is a function "
                          "f(input_shape, num_classes, **model.args) -> torch.nn.Module")
    with torch.random.fork_rng(devices=[]):  # whatever the factory draws, the global RNG is left as it was
        try:
            model = factory(input_shape, num_classes, **args)
        except Exception as e:  # noqa: BLE001 - anything the user's factory raises
            hint = ""
            if isinstance(e, TypeError):
                takes = _keyword_parameters(factory)
                hint = (f"; model {name!r} takes model.args {takes}" if takes else
                        f"; model {name!r} takes no model.args (--set 'model.args={{}}')")
            raise PluginError(f"model {name!r} with input_shape={input_shape}, num_classes={num_classes}, "
                              f"model.args={args!r}: {type(e).__name__}: {e}{hint}") from None
    if not isinstance(model, nn.Module):
        raise PluginError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_module(name: str, model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
    params = list(model.parameters())
    if not params:
        raise PluginError(f"model {name!r} has no parameters: there is nothing to train")
    bad = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if bad:
        raise PluginError(f"model {name!r} has parameters of dtype {bad}; the engine trains float32 "
                          "parameters (call .float() on the module in the factory)")
    before = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), dtype=torch.float32))
    except Exception as e:  # noqa: BLE001 - anything the user's forward raises
        raise PluginError(f"model {name!r}: forward on a batch of shape {(2, *input_shape)} failed: "
                          f"{type(e).__name__}: {e}") from None
    want = [(2, num_classes)] + ([(2,)] if num_classes == 1 else [])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) not in want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PluginError(f"model {name!r}: forward output has shape {got} for inputs {(2, *input_shape)}; "
                          f"expected {want[0]} (batch, num_classes={num_classes})")
    changed = [k for k, v in model.named_buffers() if k in before and not torch.equal(before[k], v)]
    if changed:
        raise PluginError(f"model {name!r}: training changes its buffers {changed} (e.g. BatchNorm running "
                          "statistics); buffers are not aggregated and would differ between devices. Use "
                          "track_running_stats=False or GroupNorm/LayerNorm")
    with torch.no_grad():  # leave the buffers as built
        for k, v in model.named_buffers():
            if k in before:
                v.copy_(before[k])


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, args: dict[str, Any] | None = None,
                seed: int = 0, init: str = "seeded") -> nn.Module:
    """Build model ``name`` (a :data:`MODELS` name or a plug-in reference) for inputs of
    ``input_shape`` (without the batch dimension) and ``num_classes`` outputs.
    With ``init="seeded"`` the parameters depend only on ``seed``.  Raises
    :class:`PluginError` (a ``ValueError``) naming the model and the problem."""
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
        raise ValueError(f"input_shape={input_shape!r}: expected a non-empty tuple of positive integers")
    shape = tuple(int(d) for d in shape)
    for arg, value, low in (("num_classes", num_classes, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{arg}={value!r}: must be an integer >= {low}")
    if init not in ("seeded", "module"):
        raise ValueError(f"model.init={init!r}: expected 'seeded' or 'module'")
    model = _call_factory(name, shape, int(num_classes), dict(args or {}))
    _check_module(name, model, shape, int(num_classes))
    if init == "seeded":
        seeded_init(model, int(seed))
    return model
