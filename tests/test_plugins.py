"""Plug-ins in process (COMM_SELF): model init modes, registering by name, data-set
checks, codec plug-ins, and the messages bad plug-ins give."""
from __future__ import annotations

import copy
import textwrap

import h5py
import numpy as np
import pytest
import torch

import qmlhfl_mpi
from helpers import SMALL
from qmlhfl_mpi import RunError, Session, load_config
from qmlhfl_mpi.config import build
from qmlhfl_mpi.core.codecs import make_codec
from qmlhfl_mpi.core.registry import PluginError, Registry, load_reference
from qmlhfl_mpi.learning.models import num_parameters, seeded_init


def self_comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


def raw_config(tmp_path, name="run.h5", **sections):
    raw = copy.deepcopy(SMALL)
    raw["train"]["rounds"] = 2
    raw["output"] = {"path": str(tmp_path / name)}
    raw.update(sections)
    return raw


MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, d, k, width):
            super().__init__()
            self.inp = nn.Linear(d, width)
            self.norm = nn.LayerNorm(width)
            self.out = nn.Linear(width, k)
            self.scale = nn.Parameter(torch.full((1,), 0.5))
            self.register_buffer("shift", torch.arange(d, dtype=torch.float32) / d)

        def forward(self, x):
            h = torch.relu(self.norm(self.inp(x - self.shift)))
            return self.out(h) * self.scale

    def build(input_shape, num_classes, width=8):
        return Net(input_shape[0], num_classes, width)

    def deterministic(input_shape, num_classes, width=8):
        net = Net(input_shape[0], num_classes, width)
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
        return net

    def with_batchnorm(input_shape, num_classes):
        return nn.Sequential(nn.Linear(input_shape[0], 4), nn.BatchNorm1d(4), nn.Linear(4, num_classes))

    def float64(input_shape, num_classes):
        return nn.Linear(input_shape[0], num_classes).double()

    def no_params(input_shape, num_classes):
        return nn.Identity()

    def raises(input_shape, num_classes):
        raise RuntimeError("the user's factory failed")

    NOT_CALLABLE = 3
""")


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "mymodel.py"
    p.write_text(MODEL_FILE)
    return p


def test_file_plugin_model_trains_and_its_own_init_is_replaced_by_the_seeded_one(tmp_path, model_file):
    raw = raw_config(tmp_path, model={"name": f"{model_file}:build", "args": {"width": 6}})
    cfg = load_config(raw)
    session = Session(cfg, self_comm())
    module = load_reference(f"{model_file}:build")((6,), 3, width=6)
    assert session.num_params == num_parameters(module)
    seeded_init(module, cfg.train.seed)
    expected = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy()
    assert np.array_equal(session.initial_vector, expected)
    ln = dict(session.model.named_parameters())
    assert torch.equal(ln["norm.weight"], torch.ones(6)) and torch.equal(ln["norm.bias"], torch.zeros(6))
    summary = session.run()
    assert summary.status == "completed"
    with h5py.File(cfg.output.path, "r") as f:
        assert int(f.attrs["num_params"]) == num_parameters(module) and "initial" not in f["model"]


def test_init_module_keeps_the_factory_values_and_records_them(tmp_path, model_file):
    raw = raw_config(tmp_path, model={"name": f"{model_file}:deterministic", "init": "module"})
    session = Session(load_config(raw), self_comm())
    module = load_reference(f"{model_file}:deterministic")((6,), 3)
    expected = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy()
    assert np.array_equal(session.initial_vector, expected)
    session.run()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert np.array_equal(f["model/initial"][()], expected)


def test_registering_a_model_by_name_in_python(tmp_path, model_file):
    fn = load_reference(f"{model_file}:build")
    qmlhfl_mpi.MODELS.register("test-net", fn, "a test model")
    try:
        summary = Session(load_config(raw_config(tmp_path, model={"name": "test-net"})), self_comm()).run()
        assert summary.status == "completed"
    finally:
        qmlhfl_mpi.MODELS._entries.pop("test-net")
        qmlhfl_mpi.MODELS._cache.pop("test-net", None)


@pytest.mark.parametrize("attr,message", [
    ("with_batchnorm", r"changes its buffers \['1.running_mean', '1.running_var', '1.num_batches_tracked'\]"),
    ("float64", r"dtype \['torch.float64'\].*float32"),
    ("no_params", r"has no parameters"),
    ("raises", r"RuntimeError: the user's factory failed"),
    ("NOT_CALLABLE", r"is not callable"),
    ("missing", r"has no attribute 'missing'; it defines: .*build"),
])
def test_bad_model_plugins_say_what_is_wrong(tmp_path, model_file, attr, message):
    ref = f"{model_file}:{attr}"
    with pytest.raises(RunError, match=message) as err:
        Session(load_config(raw_config(tmp_path, model={"name": ref})), self_comm())
    assert ref in str(err.value) and err.value.code == 2


def test_cnn_on_flat_data_fails_at_build_with_the_shape(tmp_path):
    with pytest.raises(RunError, match=r"model 'cnn' needs input_shape \(1, 28, 28\), got \(6,\)"):
        Session(load_config(raw_config(tmp_path, model={"name": "cnn"})), self_comm())


DATA_FILE = textwrap.dedent("""
    import numpy as np

    def good(root, train, n=60):
        g = np.random.default_rng(int(train))
        x = g.standard_normal((n, 4)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        return (x, y, np.arange(n) // 5) if train else (x[:20], y[:20])

    def regression(root, train):
        g = np.random.default_rng(int(train))
        x = g.standard_normal((60, 3)).astype(np.float32)
        return x, (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)

    def short_y(root, train):
        return np.zeros((10, 4), np.float32), np.zeros(9, np.int64)

    def one_value(root, train):
        return np.zeros((10, 4), np.float32)

    def bad_kind(root, train):
        return np.zeros((10, 4), np.float32), np.array(["a"] * 10)

    def needs_arg(root, train, *, size):
        return np.zeros((size, 4), np.float32), np.zeros(size, np.int64)
""")


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "mydata.py"
    p.write_text(DATA_FILE)
    return p


def test_natural_split_of_a_plugin_data_set(tmp_path, data_file):
    raw = raw_config(tmp_path, data={"name": f"{data_file}:good", "partition": {"kind": "natural"}},
                     model={"name": "logreg"})
    session = Session(load_config(raw), self_comm())
    # 12 owners of 5 samples over 6 devices: two owners, 10 samples each
    assert session.data.samples.tolist() == [10] * 6
    x, y, owner = load_reference(f"{data_file}:good")(None, True)
    for k, (xk, _) in session.data.train.items():
        idx = np.flatnonzero(owner // 2 == k)
        assert np.array_equal(xk.numpy(), x[idx])
    assert session.data.num_classes == 2 and session.data.input_shape == (4,)
    assert session.run().status == "completed"


def test_regression_targets_from_a_plugin(tmp_path, data_file):
    raw = raw_config(tmp_path, data={"name": f"{data_file}:regression"}, model={"name": "linear"})
    session = Session(load_config(raw), self_comm())
    assert session.data.num_classes == 1
    session.run()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert np.isnan(f["metrics/test_accuracy"][()]).all() and np.isfinite(f["metrics/test_loss"][()]).all()


@pytest.mark.parametrize("attr,args,message", [
    ("short_y", {}, r"y must be 1-D with one entry per sample \(10\), got shape \(9,\)"),
    ("one_value", {}, r"returned ndarray; expected a tuple \(x, y\) or \(x, y, owner\)"),
    ("bad_kind", {}, r"integer class labels or float targets, got dtype <U1"),
    ("needs_arg", {}, r"f\(root, train, \*\*data.args\) with data.args=\{\} failed:.*size"),
    ("good", {"n": 20}, r"natural split: the data set has 4 owners but the tree has 6 devices.*at most 4"),
])
def test_bad_data_plugins_say_what_is_wrong(tmp_path, data_file, attr, args, message):
    ref = f"{data_file}:{attr}"
    raw = raw_config(tmp_path, data={"name": ref, "args": args, "partition": {"kind": "natural"}})
    with pytest.raises(RunError, match=message) as err:
        Session(load_config(raw), self_comm())
    assert ref in str(err.value) and err.value.code == 2


def test_a_codec_plugin_is_one_file(tmp_path):
    plugin = tmp_path / "halfcodec.py"
    plugin.write_text(textwrap.dedent("""
        import numpy as np
        from qmlhfl_mpi import Codec

        class Half(Codec):
            '''float16 messages: 2 bytes a coordinate (biased by rounding, for the test).'''
            biased = True
            name = "float16"
            def nbytes(self, d):
                return 2 * d
            def variance(self, d):
                return 0.0
            def encode_vector(self, x, gen):
                return np.ascontiguousarray(x, dtype="<f2").view(np.uint8).copy()
            def decode(self, buf, d):
                return np.frombuffer(buf.tobytes(), dtype="<f2").astype(np.float32)

        def half(levels, bucket):
            return Half()
    """))
    raw = raw_config(tmp_path, quantizer={"levels": [0, 8], "bucket": 16, "kind": [f"{plugin}:half", "qsgd"]})
    cfg = load_config(raw)
    codecs = build.codecs(cfg)
    assert codecs[0].name == "float16" and codecs[1].name == "qsgd(s=8, bucket=16)"
    session = Session(cfg, self_comm())
    session.run()
    d = session.num_params
    with h5py.File(cfg.output.path, "r") as f:
        assert f["quantizer/message_bytes"][()].tolist() == [2 * d, make_codec(8, 16).nbytes(d)]
        assert [k.decode() if isinstance(k, bytes) else k for k in f["quantizer/kind"][()]] == \
            ["float16", "qsgd(s=8, bucket=16)"]
        # link 1: 6 devices x tau_2 = 2 messages per round, of 2 d bytes each
        assert f["metrics/uplink_bytes"][()][:, 0].tolist() == [6 * 2 * 2 * d] * 2


def test_registry_and_reference_errors():
    reg = Registry("widget", "x.kind")
    reg.register("a", "json:dumps", "json")
    assert reg.resolve("a")([1]) == "[1]"
    with pytest.raises(ValueError, match="registered already"):
        reg.register("a", len)
    with pytest.raises(PluginError, match=r"x.kind = 'b': unknown widget; valid: 'a', or a plug-in"):
        reg.resolve("b")
    with pytest.raises(PluginError, match=r"cannot import module 'no_such_module_xyz'"):
        load_reference("no_such_module_xyz:f")
    with pytest.raises(PluginError, match=r"expected 'package.module:attr'"):
        load_reference("json:")


def test_dropout_is_reproducible_and_rank_invariant(tmp_path):
    """Randomness inside a plug-in's forward is keyed by (seed, device, round, call), not global state."""
    from helpers import run_cli

    plugin = tmp_path / "drop.py"
    plugin.write_text(textwrap.dedent("""
        from torch import nn
        def build(input_shape, num_classes):
            return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, num_classes))
    """))
    models = []
    for name in ("a.h5", "b.h5"):
        torch.manual_seed(len(models))  # a different global state each time: it must not matter
        cfg = load_config(raw_config(tmp_path, name, model={"name": f"{plugin}:build"}))
        Session(cfg, self_comm()).run()
        with h5py.File(tmp_path / name, "r") as f:
            models.append(f["model/final"][()])
    assert np.array_equal(models[0], models[1])
    cfg_path = tmp_path / "c.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(raw_config(tmp_path, "c.h5", model={"name": f"{plugin}:build"})))
    proc, _ = run_cli(2, ["run", str(cfg_path), "--quiet"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert np.array_equal(f["model/final"][()], models[0])
