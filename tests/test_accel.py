"""The device arithmetic (``qmlhfl_mpi.accel``) on CPU tensors against the host: QSGD messages
byte-identical to the numpy reference and sums bit-identical, for every width, bucket, ragged
tail and non-finite input; the host path for codecs with no device form; the server optimisers
on tensors; and the torch vector backend's mapping of codecs."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from codec_cases import LENGTHS, LEVELS, pair
from qmlhfl_mpi.accel import DEVICE_CODECS, TorchVectors
from qmlhfl_mpi.accel.hosted import HostedCodec
from qmlhfl_mpi.accel.identity import TorchIdentity
from qmlhfl_mpi.accel.qsgd import MAX_ROWS, TorchQSGD, _mul32, pack_bits, uniforms, unpack_bits
from qmlhfl_mpi.core.codecs import link_codecs, make_codec
from qmlhfl_mpi.core.codecs.bitpack import pack
from qmlhfl_mpi.core.codecs.identity import IdentityCodec
from qmlhfl_mpi.core.codecs.qsgd import QSGDCodec, decode_add_reference, encode_reference
from qmlhfl_mpi.core.codecs.stream import uniforms as host_uniforms
from qmlhfl_mpi.core.server_opt import make_server_optimizer, sign, sqrt
from qmlhfl_mpi.core.vectors import HostVectors, through_host

T = torch.from_numpy


@pytest.mark.parametrize("s", LEVELS)
@pytest.mark.parametrize("bucket", [0, 7, 512])
def test_device_qsgd_is_byte_and_bit_identical_to_the_reference(s, bucket):
    """encode, encode_add, decode and decode_add on tensors (the norm's row loop on the tensors for
    every bucket: max_rows=None) against the numpy reference, over lengths and input kinds."""
    codec = QSGDCodec(s, bucket)
    dev = TorchQSGD(codec, "cpu", max_rows=None)
    for d in LENGTHS:
        for kind in ("normal", "nonfinite", "zeros"):
            child, parent = pair(d, s * 31 + d, kind)
            key = (7, 4, 2, d % 5, s, bucket)
            ref = encode_reference(codec, child, parent, key)
            msg = dev.encode(T(child), T(parent), key)
            assert msg.dtype == np.uint8 and msg.size == codec.nbytes(d)
            assert np.array_equal(msg, ref), (s, bucket, d, kind)
            start = np.random.default_rng(d).standard_normal(d).astype(np.float32)
            want = start.copy()
            decode_add_reference(codec, ref, np.float32(1 / 3), want)
            got, fused = T(start.copy()), T(start.copy())
            dev.decode_add(ref, np.float32(1 / 3), got)
            dev.encode_add(T(child), T(parent), key, np.float32(1 / 3), fused)
            assert np.array_equal(got.numpy(), want, equal_nan=True), (s, bucket, d, kind)
            assert np.array_equal(fused.numpy(), want, equal_nan=True), (s, bucket, d, kind)
            assert np.array_equal(dev.decode(ref, d).numpy(), codec.decode(ref, d), equal_nan=True)
            if kind == "nonfinite" and d:
                assert np.isnan(got.numpy()).any()


def test_long_buckets_are_encoded_through_the_host_with_the_same_bytes():
    codec = QSGDCodec(16, 0)  # one norm over the whole vector
    d = 8 * MAX_ROWS + 1
    dev = TorchQSGD(codec, "cpu")
    assert dev.through_host(d) and not dev.through_host(8 * MAX_ROWS)
    assert not TorchQSGD(codec, "cpu", max_rows=None).through_host(d)
    child, parent = pair(d, 5)
    key = (3, 1, 4)
    assert np.array_equal(dev.encode(T(child), T(parent), key), encode_reference(codec, child, parent, key))
    acc, want = torch.zeros(d), np.zeros(d, np.float32)
    dev.encode_add(T(child), T(parent), key, np.float32(0.5), acc)
    codec.encode_add(child, parent, key, np.float32(0.5), want)
    assert np.array_equal(acc.numpy(), want)


def test_stream_and_bit_packing_match_the_host():
    for k0, k1 in ((0, 0), (0xFFFFFFFF, 0x12345678), (123456789, 987654321)):
        assert np.array_equal(uniforms(k0, k1, 70000, torch.device("cpu")).numpy(), host_uniforms(k0, k1, 0, 70000))
    a = np.random.default_rng(1).integers(0, 2**32, 10000, dtype=np.uint64)
    for c in (0x9E3779B1, 0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 1):
        want = (a * np.uint64(c)) & np.uint64(0xFFFFFFFF)  # uint64 wraps mod 2^64: the low 32 bits are exact
        assert np.array_equal(_mul32(T(a.astype(np.int64)), c).numpy().astype(np.uint64), want), hex(c)
    g = np.random.default_rng(2)
    for w in range(1, 17):
        for d in (0, 1, 7, 8, 9, 1001):
            codes = g.integers(0, 1 << w, d).astype(np.uint16)
            packed = pack_bits(T(codes.astype(np.int32)), w)
            assert np.array_equal(packed.numpy(), pack(codes, w)), (w, d)
            assert np.array_equal(unpack_bits(packed, w, d).numpy(), codes.astype(np.int32)), (w, d)


@pytest.mark.parametrize("kind,levels,bucket", [("topk", 4, 16), ("sign", 1, 16), ("round", 5, 16),
                                                 ("qsgd", 8, "tensor"), ("none", 0, 16)])
def test_codecs_without_a_device_form_give_the_hosts_bytes_and_sums(kind, levels, bucket):
    sizes = (300, 37, 663)
    codec = make_codec(levels, bucket, kind, fraction=0.2, tensor_sizes=sizes)
    dev = TorchVectors("cpu").link_codec(codec)
    d = sum(sizes)
    child, parent = pair(d, 11)
    key = (9, 2, 1, 3)
    msg = dev.encode(T(child), T(parent), key)
    assert np.array_equal(msg, codec.encode(child, parent, key))
    acc, want = T(np.ones(d, np.float32)), np.ones(d, np.float32)
    dev.decode_add(msg, np.float32(0.3), acc)
    codec.decode_add(msg, np.float32(0.3), want)
    dev.encode_add(T(child), T(parent), key, np.float32(0.7), acc)
    codec.encode_add(child, parent, key, np.float32(0.7), want)
    assert np.array_equal(acc.numpy(), want)
    assert np.array_equal(dev.decode(msg, d).numpy(), codec.decode(msg, d))
    assert through_host(dev, d) == (kind != "none")


def test_the_backend_maps_codecs_by_exact_class():
    vec = TorchVectors("cpu")
    qsgd, rnd, none, sign = link_codecs([8, 5, 0, 1], 16, ["qsgd", "round", "qsgd", "sign"])
    assert isinstance(vec.link_codec(qsgd), TorchQSGD)
    assert isinstance(vec.link_codec(rnd), HostedCodec)  # round subclasses QSGDCodec but computes otherwise
    assert isinstance(vec.link_codec(none), TorchIdentity)
    assert isinstance(vec.link_codec(sign), HostedCodec)
    assert set(DEVICE_CODECS) == {QSGDCodec, IdentityCodec}
    assert HostVectors().link_codec(qsgd) is qsgd and not through_host(qsgd, 10**7)
    assert vec.name == "torch:cpu" and HostVectors().name == "host"
    x = np.arange(5, dtype=np.float32)
    t = vec.from_host(x)
    t += 1  # a copy, not a view of the host array
    assert x[0] == 0 and np.array_equal(vec.to_host(t), x + 1)


@pytest.mark.parametrize("kind", ["avg", "momentum", "adam", "yogi"])
def test_server_optimizers_give_the_same_bits_on_tensors(kind):
    opt = make_server_optimizer(kind, lr=0.05, momentum=0.9, betas=(0.8, 0.95), eps=1e-3)
    g = np.random.default_rng(4)
    d = 4099
    v_np = g.standard_normal(d).astype(np.float32)
    st_np = opt.init_state(d)
    v_t, st_t = T(v_np.copy()), {k: T(a.copy()) for k, a in opt.init_state(d).items()}
    for step in range(4):
        grad = (g.standard_normal(d) * 10.0 ** g.integers(-6, 2, d)).astype(np.float32)
        if step == 2:
            grad[:3] = [np.nan, 0.0, -0.0]
        v_np = opt.apply(v_np, grad, st_np)
        v_t = opt.apply(v_t, T(grad.copy()), st_t)
        assert np.array_equal(v_t.numpy(), v_np, equal_nan=True), (kind, step)
        for k in st_np:
            assert np.array_equal(st_t[k].numpy(), st_np[k], equal_nan=True), (kind, step, k)


def test_sqrt_and_sign_are_the_same_on_arrays_and_tensors():
    x = np.abs(np.random.default_rng(3).standard_normal(200000)).astype(np.float32) * 7
    assert np.array_equal(sqrt(T(x)).numpy(), sqrt(x))
    y = np.array([np.nan, -0.0, 0.0, -2, 3, np.inf, -np.inf], np.float32)
    assert np.array_equal(sign(T(y)).numpy(), sign(y), equal_nan=True)


def test_gpu_ranks_ask_for_deterministic_kernels():
    """What a GPU rank sets (run in a fresh interpreter: the switches are process-wide); the CNN still
    trains under them on the CPU."""
    code = """
import os, torch
from qmlhfl_mpi.comm.placement import deterministic_cuda
from qmlhfl_mpi.learning.models import build_model
deterministic_cuda()
assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
model = build_model("cnn", (1, 28, 28), 10, seed=0)
loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
loss.backward()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
