"""Models: parameter counts, shapes, seeded initialisation, errors."""
from __future__ import annotations

import pytest
import torch

from qmlhfl_mpi.learning.models import build_model, num_parameters
from qmlhfl_mpi.learning.registry import MODELS

MODEL_NAMES = MODELS.names()


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _lin(fin: int, fout: int) -> int:
    return fin * fout + fout


CASES = {
    "logreg": ((60,), 10, _lin(60, 10)),
    "mlp": ((1, 28, 28), 10, _lin(784, 64) + _lin(64, 64) + _lin(64, 10)),  # hidden defaults to 64
    "cnn": ((1, 28, 28), 10, _conv(1, 32, 5) + _conv(32, 64, 5) + _lin(3136, 512) + _lin(512, 10)),
    "cifar-cnn": ((3, 32, 32), 10, _conv(3, 32, 3) + _conv(32, 64, 3) + _conv(64, 64, 3)
                  + _lin(1024, 64) + _lin(64, 10)),
    "linear": ((60,), 1, _lin(60, 1)),  # least squares: one output
}


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_cases_cover_all_models():
    assert set(CASES) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_and_output_shape(name):
    shape, classes, expected = CASES[name]
    model = build_model(name, shape, classes)
    assert num_parameters(model) == expected
    out = model(torch.randn(5, *shape))
    assert tuple(out.shape) == (5, classes) and out.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_known_sizes():
    assert num_parameters(build_model("cnn", (1, 28, 28), 10)) == 1_663_370  # FedAvg's CNN, ~1.66 M
    assert num_parameters(build_model("mlp", (1, 28, 28), 10, args={"hidden": 200})) == 199_210  # FedAvg's 2NN
    assert num_parameters(build_model("mlp", (60,), 10, args={"hidden": 64})) == _lin(60, 64) + _lin(64, 64) + _lin(64, 10)
    assert num_parameters(build_model("logreg", (3, 32, 32), 100)) == _lin(3072, 100)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_init_is_seeded_and_ignores_global_rng(name):
    shape, classes, _ = CASES[name]
    torch.manual_seed(1)
    a = _flat(build_model(name, shape, classes, seed=5))
    torch.manual_seed(12345)
    torch.rand(17)
    state = torch.get_rng_state()
    b = _flat(build_model(name, shape, classes, seed=5))
    assert torch.equal(torch.get_rng_state(), state), "building a model must not draw from the global RNG"
    c = _flat(build_model(name, shape, classes, seed=6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.abs().max() <= 1.0 and a.std() > 0  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zeros


def test_init_bounds_follow_fan_in():
    model = build_model("cnn", (1, 28, 28), 10, seed=0)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            bound = module.weight[0].numel() ** -0.5
            assert module.weight.abs().max() <= bound
            assert module.weight.abs().max() > 0.9 * bound


@pytest.mark.parametrize("name,shape,needed", [
    ("cnn", (3, 32, 32), (1, 28, 28)),
    ("cnn", (784,), (1, 28, 28)),
    ("cifar-cnn", (1, 28, 28), (3, 32, 32)),
])
def test_shape_errors(name, shape, needed):
    with pytest.raises(ValueError) as err:
        build_model(name, shape, 10)
    assert f"'{name}'" in str(err.value) and f"needs input_shape {needed}, got {shape}" in str(err.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="resnet"), r"'resnet'.*logreg.*cifar-cnn"),
    (dict(num_classes=0), r"num_classes=0.*>= 1"),
    (dict(args={"hidden": 0}), r"hidden=0.*>= 1"),
    (dict(args={"width": 3}), r"'mlp'.*width"),
    (dict(seed=-3), r"seed=-3.*>= 0"),
    (dict(input_shape=(0, 5)), r"input_shape=\(0, 5\)"),
])
def test_argument_errors(kwargs, match):
    args = {"name": "mlp", "input_shape": (60,), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(args.pop("name"), args.pop("input_shape"), args.pop("num_classes"), **args)
