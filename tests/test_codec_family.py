"""The codec family beyond qsgd: topk, sign, round (biased) and per-tensor buckets (bucket: tensor),
each against an independent oracle; plus the contract every codec keeps (exact byte lengths,
bit-identical decode_add/encode_add, non-finite inputs never crash)."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from qmlhfl_mpi.core.codecs import CODECS
from qmlhfl_mpi.core.codecs.bitpack import pack
from qmlhfl_mpi.core.codecs.identity import IdentityCodec
from qmlhfl_mpi.core.codecs.qsgd import QSGDCodec, encode_reference, level_bits, qsgd, variance_factor
from qmlhfl_mpi.core.codecs.rounding import RoundCodec, round_nearest
from qmlhfl_mpi.core.codecs.sign import SignCodec, sign
from qmlhfl_mpi.core.codecs.stream import GOLDEN32, key_words, uniforms
from qmlhfl_mpi.core.codecs.tensor import TensorBucketCodec, shifted_words
from qmlhfl_mpi.core.codecs.topk import (
    TopKCodec,
    index_bits,
    pack_indices,
    topk,
    topk_count,
    topk_indices,
    unpack_indices,
)

LENGTHS = [0, 1, 2, 5, 1000, 100003]
SIZES = (3, 1, 64, 1000, 7)  # a model's parameter tensors
D = sum(SIZES)


def _vec(d, seed, kind="normal"):
    g = np.random.default_rng(seed)
    x = g.standard_normal(d).astype(np.float32)
    if kind == "nonfinite" and d:
        for k, v in zip(g.choice(d, min(d, 7), replace=False), [np.inf, -np.inf, np.nan, np.inf, np.nan, -np.inf, 1e38]):
            x[k] = v
    if kind == "ties" and d:
        x = g.choice(np.array([0, 1, -1, 2, -2, np.inf, -np.inf, np.nan], dtype=np.float32), d)
    if kind == "zeros":
        x[:] = 0
    return x


def _bits(x):
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _same(a, b):
    """Bit-identical float32 arrays."""
    return a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


# ---------------------------------------------------------------------------------------------- topk


def _topk_oracle(x, k):
    """Sorted-based: NaN above inf above finite, larger magnitude first, lower index on ties."""
    def rank(i):
        v = float(x[i])
        return (2, 0.0) if math.isnan(v) else (1, 0.0) if math.isinf(v) else (0, abs(v))
    order = sorted(range(x.size), key=lambda i: (tuple(-r for r in rank(i)), i))
    return np.array(sorted(order[:k]), dtype=np.int64)


def test_topk_count_and_bits():
    assert [topk_count(d, 0.01) for d in (0, 1, 2, 99, 100, 101, 1000)] == [0, 1, 1, 1, 1, 2, 10]
    assert topk_count(100, 0.07) == 7  # the decimal 0.07, not binary 0.07 * 100 = 7.000000000000001
    assert topk_count(10, 1.0) == 10 and topk_count(10, 1) == 10 and topk_count(10**6, 1e-9) == 1
    assert [index_bits(d) for d in (0, 1, 2, 3, 4, 5, 1024, 1025, 1_660_000)] == [1, 1, 1, 2, 2, 3, 10, 11, 21]


@pytest.mark.parametrize("kind", ["normal", "ties", "nonfinite", "zeros"])
def test_topk_keeps_exactly_the_k_largest_magnitudes(kind):
    for d in (1, 2, 3, 5, 17, 200, 1000):
        x = _vec(d, d + 11, kind)
        for k in sorted({1, 2, d // 3, d // 2, d - 1, d} - {0}):
            got = topk_indices(x, k)
            assert np.array_equal(got, _topk_oracle(x, k)), (kind, d, k)
    x = _vec(1000, 3, "nonfinite")
    assert set(np.flatnonzero(~np.isfinite(x))) <= set(topk_indices(x, 10))  # NaN and inf always kept first


def test_topk_nan_with_its_sign_bit_set_is_still_largest():
    x = np.array([1.0, 5.0, 3.0, 0.0], dtype=np.float32)
    x.view(np.uint32)[3] = 0xFFC00001  # a negative-signed NaN
    assert list(topk_indices(x, 1)) == [3] and list(topk_indices(x, 2)) == [1, 3]


@pytest.mark.parametrize("fraction", [1e-6, 0.01, 0.07, 0.3, 0.5, 1.0])
def test_topk_bytes_and_round_trip(fraction):
    codec = topk(levels=4, bucket=512, fraction=fraction)
    assert codec.biased and codec.name == f"topk(fraction={fraction!r})"
    for d in LENGTHS:
        for kind in ("normal", "ties", "nonfinite"):
            x = _vec(d, d + 5, kind)
            parent = _vec(d, d + 6)
            child = (x + parent).astype(np.float32)
            diff = child - parent
            k, b = topk_count(d, fraction), index_bits(d)
            msg = codec.encode(child, parent, (1, 2, 3))
            assert msg.dtype == np.uint8 and msg.size == codec.nbytes(d) == 4 * k + math.ceil(k * b / 8)
            idx = topk_indices(diff, k)
            assert np.array_equal(unpack_indices(msg[4 * k :], b, k), idx)
            assert _same(np.frombuffer(msg[: 4 * k].tobytes(), "<f4"), diff[idx])
            dec = codec.decode(msg, d)
            expect = np.zeros(d, np.float32)
            expect[idx] = diff[idx]
            assert _same(dec, expect)
            assert np.array_equal(codec.encode(child, parent, (9,)), msg)  # deterministic
            if d:
                assert codec.variance(d) == pytest.approx(1 - k / d)
                if kind == "normal":
                    assert np.sum((dec - diff) ** 2.0) <= codec.variance(d) * np.sum(diff**2.0) * (1 + 1e-6)


def test_topk_index_packing_matches_bitpack_and_round_trips_wide():
    g = np.random.default_rng(0)
    for b in (1, 2, 3, 5, 8, 9, 13, 16, 17, 21, 31, 32, 33, 40):
        for k in (0, 1, 7, 64, 1001):
            idx = np.sort(g.integers(0, 2**b, k, dtype=np.int64))
            data = pack_indices(idx, b)
            assert data.size == math.ceil(k * b / 8)
            assert np.array_equal(unpack_indices(data, b, k), idx), (b, k)
            if b > 16:  # the wide path against the generic LSB-first concatenation
                assert np.array_equal(data, _lsb_concat(idx, b))
            else:
                assert np.array_equal(data, pack(idx.astype(np.uint16), b))


def _lsb_concat(vals, b):
    bits = [(int(v) >> j) & 1 for v in vals for j in range(b)]
    bits += [0] * (-len(bits) % 8)
    return np.array([sum(bits[i + j] << j for j in range(8)) for i in range(0, len(bits), 8)], dtype=np.uint8)


def test_topk_large_model_is_fast_and_exact():
    d = 1_660_000
    x = _vec(d, 42)
    codec = TopKCodec(0.01)
    msg = codec.encode(x, np.zeros_like(x), (0,))
    k = topk_count(d, 0.01)
    assert msg.size == codec.nbytes(d) == 4 * k + math.ceil(k * 21 / 8)
    expect = np.sort(np.lexsort((np.arange(d), -np.abs(x)))[:k])
    assert np.array_equal(unpack_indices(msg[4 * k :], 21, k), expect)
    dec = codec.decode(msg, d)
    assert np.count_nonzero(dec) == k and _same(dec[expect], x[expect])


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_topk_fraction_is_validated(bad):
    with pytest.raises(ValueError, match="fraction"):
        topk(levels=0, bucket=0, fraction=bad)


def test_topk_decode_rejects_wrong_length_and_bad_indices():
    codec = TopKCodec(0.5)
    msg = codec.encode(_vec(10, 1), np.zeros(10, np.float32), ())
    with pytest.raises(ValueError, match="expected"):
        codec.decode(msg[:-1], 10)
    bad = msg.copy()
    bad[20:] = 0xFF  # indices 15, 15, ...: out of range
    with pytest.raises(ValueError, match="ascending"):
        codec.decode(bad, 10)


# ---------------------------------------------------------------------------------------------- sign


def _sign_oracle(x, bucket):
    d = x.size
    blen = d if bucket == 0 or bucket >= d else bucket
    if d == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    starts = np.arange(0, d, blen)
    counts = np.minimum(blen, d - starts)
    with np.errstate(invalid="ignore"):
        scales = (np.add.reduceat(np.abs(x.astype(np.float64)), starts) / counts).astype(np.float32)
    mag = np.repeat(scales, counts)
    return np.where(x < 0, -mag, mag), scales


@pytest.mark.parametrize("bucket", [0, 1, 7, 512, 10**6])
def test_sign_decodes_to_plus_minus_the_mean_magnitude(bucket):
    codec = sign(levels=16, bucket=bucket)
    assert codec.biased and codec.name == f"sign(bucket={bucket})"
    for d in LENGTHS:
        for kind in ("normal", "ties", "zeros"):
            x = _vec(d, d + 1, kind)
            if kind == "ties":
                x[~np.isfinite(x)] = 3
            nb = 0 if d == 0 else 1 if bucket in (0,) or bucket >= d else math.ceil(d / bucket)
            msg = codec.encode(x, np.zeros_like(x), (5,))
            assert msg.size == codec.nbytes(d) == 4 * nb + math.ceil(d / 8)
            expect, scales = _sign_oracle(x, bucket)
            assert _same(np.frombuffer(msg[: 4 * nb].tobytes(), "<f4"), scales)
            assert np.array_equal(np.unpackbits(msg[4 * nb :], count=d, bitorder="little"), (x < 0).astype(np.uint8))
            dec = codec.decode(msg, d)
            assert np.array_equal(dec, expect)
            if d:
                blen = d if bucket == 0 or bucket >= d else bucket
                assert codec.variance(d) == 1 - 1 / blen
                err, norm2 = np.sum((dec - x).astype(np.float64) ** 2), np.sum(x.astype(np.float64) ** 2)
                assert err <= codec.variance(d) * norm2 * (1 + 1e-5) + 1e-30


def test_sign_contraction_is_attained_by_a_single_spike():
    x = np.zeros(16, np.float32)
    x[3] = 2
    codec = SignCodec(0)
    dec = codec.decode(codec.encode(x, np.zeros_like(x), ()), 16)
    assert np.sum((dec - x) ** 2) == pytest.approx(codec.variance(16) * np.sum(x**2))


def test_sign_non_finite_buckets_decode_to_non_finite_scales():
    x = np.ones(24, np.float32)
    x[2], x[9] = np.inf, np.nan
    codec = SignCodec(8)
    dec = codec.decode(codec.encode(x, np.zeros_like(x), ()), 24)
    assert np.all(np.isposinf(dec[:8])) and np.all(np.isnan(dec[8:16])) and np.all(dec[16:] == 1)


# ---------------------------------------------------------------------------------------------- round


def _round_oracle(x, norms, s, bucket):
    """Levels by search: the level in 0..s nearest to |x| * float32(s / norm), ties up."""
    d = x.size
    blen = d if bucket == 0 or bucket >= d else bucket
    out = np.zeros(d, np.float32)
    for b, lo in enumerate(range(0, d, max(blen, 1))):
        xb, norm = x[lo : lo + blen], norms[b]
        if not norm > 0:
            continue
        y = (np.abs(xb) * (np.float32(s) / norm)).astype(np.float64)
        near = np.clip(np.trunc(y)[:, None] + np.arange(-1, 3)[None, :], 0, s)  # the candidates around y
        dist = np.abs(near - y[:, None])
        level = near[np.arange(y.size), 3 - np.argmin(dist[:, ::-1], axis=1)]  # the largest of the nearest
        f = np.float32(norm / np.float32(s))
        out[lo : lo + blen] = np.where(xb < 0, -level, level).astype(np.float32) * f
    return out


@pytest.mark.parametrize("s,bucket", [(1, 0), (2, 7), (3, 512), (16, 0), (16, 512), (255, 64)])
def test_round_decodes_to_the_nearest_level(s, bucket):
    codec = round_nearest(levels=s, bucket=bucket)
    assert codec.biased and isinstance(codec, RoundCodec) and codec.name == f"round(s={s}, bucket={bucket})"
    for d in LENGTHS:
        x = _vec(d, s + d)
        parent = _vec(d, s + d + 1)
        child = (x + parent).astype(np.float32)
        diff = child - parent
        msg = codec.encode(child, parent, (1,))
        assert msg.size == codec.nbytes(d) == QSGDCodec(s, bucket).nbytes(d)
        assert np.array_equal(msg, codec.encode(child, parent, (2, 3)))  # key-independent
        nb = QSGDCodec(s, bucket)._blocks(d)[0] if d else 0
        norms = np.frombuffer(msg[: 4 * nb].tobytes(), "<f4")
        blen = d if bucket == 0 or bucket >= d else bucket
        exact = [np.linalg.norm(diff[lo : lo + blen].astype(np.float64)) for lo in range(0, d, max(blen, 1))]
        assert np.allclose(norms, exact, rtol=1e-5)
        dec = codec.decode(msg, d)
        assert np.array_equal(dec, _round_oracle(diff, norms, s, bucket)), (s, bucket, d)
        if d:
            per_coord = np.repeat(norms, blen)[:d] / (2 * s)
            assert np.all(np.abs(dec - diff) <= per_coord * (1 + 1e-5) + 1e-30)
            assert codec.variance(d) == min(1.0, blen / (4 * s * s))
            err, norm2 = np.sum((dec - diff).astype(np.float64) ** 2), np.sum(diff.astype(np.float64) ** 2)
            assert err <= codec.variance(d) * norm2 * (1 + 1e-5)


def test_round_halves_go_up_and_levels_clip():
    codec = RoundCodec(2, 0)
    x = np.array([3.0, 4.0], np.float32)  # norm 5: y = 1.2, 1.6 -> levels 1, 2
    dec = codec.decode(codec.encode(x, np.zeros_like(x), ()), 2)
    assert np.array_equal(dec, np.float32(2.5) * np.array([1, 2], np.float32))
    x = np.array([1.0, 0.0, 0.0, 0.0], np.float32)  # y = 2 exactly: level s
    assert np.array_equal(codec.decode(codec.encode(x, np.zeros_like(x), ()), 4), x)
    x = np.array([1.0, 1.0, 1.0, 1.0], np.float32)  # norm 2, s = 1: y = 0.5 exactly -> 1 (half up)
    assert np.array_equal(RoundCodec(1, 0).decode(RoundCodec(1, 0).encode(x, np.zeros_like(x), ()), 4),
                          np.full(4, 2, np.float32))


def test_round_zero_levels_is_an_error_naming_none():
    with pytest.raises(ValueError, match="'none'"):
        round_nearest(levels=0, bucket=512)
    with pytest.raises(ValueError, match="out of range"):
        round_nearest(levels=-1, bucket=512)


# ------------------------------------------------------------------------------------- bucket: tensor


def test_stream_shift_gives_the_whole_vector_uniforms():
    k0, k1 = key_words((3, 1, 4, 1, 5))
    for start, n in ((0, 10), (3, 64), (1067, 7), (2**31 + 5, 9)):
        w0, w1 = shifted_words(k0, k1, start)
        assert w0 == (k0 + start * GOLDEN32) % 2**32 and w1 == k1
        assert np.array_equal(uniforms(w0, w1, 0, n), uniforms(k0, k1, start, start + n))


@pytest.mark.parametrize("s", [1, 4, 16, 255, 32767])
def test_qsgd_tensor_buckets_wire(s):
    codec = qsgd(levels=s, bucket="tensor", tensor_sizes=SIZES)
    assert isinstance(codec, TensorBucketCodec) and not codec.biased
    assert codec.name == f"qsgd(s={s}, bucket=tensor)"
    w = 1 + level_bits(s)
    assert codec.nbytes(D) == sum(4 + math.ceil(n * w / 8) for n in SIZES)
    assert codec.variance(D) == max(variance_factor(n, s, 0) for n in SIZES)
    for kind in ("normal", "nonfinite", "zeros"):
        child, parent = _vec(D, s, kind), _vec(D, s + 1)
        key = (7, 4, s)
        msg = codec.encode(child, parent, key)
        assert msg.size == codec.nbytes(D)
        k0, k1 = key_words(key)
        inner, lo, pos = QSGDCodec(s, 0), 0, 0
        for n in SIZES:  # each part: the bucket-0 message of the slice under the shifted words
            part = inner.encode_words(child[lo : lo + n], parent[lo : lo + n], *shifted_words(k0, k1, lo))
            assert np.array_equal(msg[pos : pos + part.size], part)
            lo, pos = lo + n, pos + part.size
        assert pos == msg.size
    with pytest.raises(ValueError, match="does not match"):
        codec.nbytes(D + 1)
    with pytest.raises(ValueError, match="does not match"):
        codec.encode(np.zeros(D - 1, np.float32), np.zeros(D - 1, np.float32), (0,))


@pytest.mark.parametrize("s", [2, 16])
def test_qsgd_one_tensor_is_the_bucket_0_message(s):
    for d in (1, 5, 1000, 100003):
        child, parent = _vec(d, d), _vec(d, d + 1)
        one = qsgd(levels=s, bucket="tensor", tensor_sizes=[d])
        ref = QSGDCodec(s, 0)
        assert one.nbytes(d) == ref.nbytes(d)
        assert np.array_equal(one.encode(child, parent, (1, 2)), ref.encode(child, parent, (1, 2)))
        assert np.array_equal(one.encode(child, parent, (1, 2)), encode_reference(ref, child, parent, (1, 2)))


def test_qsgd_tensor_norms_are_per_tensor():
    codec = qsgd(levels=8, bucket="tensor", tensor_sizes=SIZES)
    starts = np.cumsum((0,) + SIZES)
    w = 1 + level_bits(8)
    offsets = np.cumsum([0] + [4 + math.ceil(n * w / 8) for n in SIZES])
    for t in range(len(SIZES)):
        x = np.zeros(D, np.float32)
        lo, hi = starts[t], starts[t + 1]
        x[lo:hi] = _vec(hi - lo, t)
        msg = codec.encode(x, np.zeros_like(x), (t,))
        norms = [np.frombuffer(msg[o : o + 4].tobytes(), "<f4")[0] for o in offsets[:-1]]
        expect = [np.linalg.norm(x[a:b].astype(np.float64)) for a, b in zip(starts[:-1], starts[1:])]
        assert np.allclose(norms, expect, rtol=1e-6, atol=0)
        dec = codec.decode(msg, D)
        assert np.all(dec[:lo] == 0) and np.all(dec[hi:] == 0)
        assert np.all(np.abs(dec[lo:hi]) <= norms[t] * (1 + 1e-6))


def test_qsgd_tensor_buckets_are_unbiased():
    s, sizes = 2, (3, 5, 8)
    codec = qsgd(levels=s, bucket="tensor", tensor_sizes=sizes)
    x = _vec(16, 123)
    n = 4000
    acc = np.zeros(16, np.float64)
    for r in range(n):
        acc += codec.decode(codec.encode(x, np.zeros_like(x), (99, r)), 16)
    mean = acc / n
    norms = np.repeat([np.linalg.norm(x[a:b]) for a, b in ((0, 3), (3, 8), (8, 16))], sizes)
    sd = norms / s / 2  # per coordinate: (norm/s) * sqrt(p(1-p)) <= norm / (2s)
    assert np.all(np.abs(mean - x) <= 6 * sd / math.sqrt(n))


@pytest.mark.parametrize("factory,inner", [(sign, SignCodec(0)), (round_nearest, RoundCodec(5, 0))])
def test_sign_and_round_take_tensor_buckets_too(factory, inner):
    codec = factory(levels=5, bucket="tensor", tensor_sizes=SIZES)
    assert isinstance(codec, TensorBucketCodec) and codec.biased and codec.name.endswith("bucket=tensor)")
    assert codec.nbytes(D) == sum(inner.nbytes(n) for n in SIZES)
    assert codec.variance(D) == max(inner.variance(n) for n in SIZES)
    x = _vec(D, 8)
    msg = codec.encode(x, np.zeros_like(x), (1,))
    parts = np.concatenate([inner.encode(x[a : a + n], np.zeros(n, np.float32), ())
                            for a, n in zip(np.cumsum((0,) + SIZES), SIZES)])
    assert np.array_equal(msg, parts)


def test_tensor_bucket_arguments_are_validated():
    for f in (qsgd, sign, round_nearest):
        with pytest.raises(ValueError, match="tensor_sizes=None"):
            f(levels=4, bucket="tensor")
        for bad in ([], [3, 0], [2, -1], [True, 2], ["3"], "34", 5):
            with pytest.raises(ValueError, match="tensor_sizes"):
                f(levels=4, bucket="tensor", tensor_sizes=bad)
        for bad in ("tensors", -1, 1.5, True, None):
            with pytest.raises(ValueError, match="bucket"):
                f(levels=4, bucket=bad)
    with pytest.raises(TypeError):
        qsgd(levels=4, bucket=512, fraction=0.1)
    assert qsgd(levels=0, bucket="tensor", tensor_sizes=SIZES) == IdentityCodec()


def test_integer_buckets_are_unchanged_and_ignore_tensor_sizes():
    child, parent = _vec(5000, 1), _vec(5000, 2)
    for s, bucket in ((4, 512), (16, 0), (255, 7)):
        for codec in (qsgd(s, bucket), qsgd(levels=s, bucket=bucket, tensor_sizes=(4000, 1000))):
            assert codec == QSGDCodec(s, bucket) and codec.name == f"qsgd(s={s}, bucket={bucket})"
            assert np.array_equal(codec.encode(child, parent, (3,)), encode_reference(QSGDCodec(s, bucket), child, parent, (3,)))
    assert sign(0, 64, tensor_sizes=(1, 2)) == SignCodec(64)
    assert round_nearest(4, 64, tensor_sizes=(1, 2)) == RoundCodec(4, 64)


# ------------------------------------------------------------------------------- the common contract


def _family(d):
    codecs = [TopKCodec(0.01), TopKCodec(0.3), TopKCodec(1.0), SignCodec(0), SignCodec(7), RoundCodec(1, 0),
              RoundCodec(16, 512), RoundCodec(255, 7), QSGDCodec(16, 7)]
    if d:
        sizes = (d,) if d < 3 else (1, d - 2, 1)
        codecs += [qsgd(16, "tensor", sizes), sign(0, "tensor", sizes), round_nearest(3, "tensor", sizes)]
    return codecs


@pytest.mark.parametrize("kind", ["normal", "nonfinite", "zeros", "ties"])
def test_every_codec_keeps_the_contract(kind):
    for d in LENGTHS:
        for codec in _family(d):
            acc0 = _vec(d, d + 3)
            if d:
                acc0[0] = -0.0  # -0.0 + 0.0 is +0.0: a sparse shortcut would show here
            for m, a in enumerate((np.float32(0.25), np.float32(1 / 3))):
                child, parent = _vec(d, 10 * m + d, kind), _vec(d, 10 * m + d + 1)
                key = (m, 7)
                msg = codec.encode(child, parent, key)
                assert msg.dtype == np.uint8 and msg.size == codec.nbytes(d), (codec.name, d)
                dec = codec.decode(msg, d)
                assert dec.dtype == np.float32 and dec.size == d
                expect = acc0.copy()
                tmp = dec.copy()
                tmp *= a
                expect += tmp
                got = acc0.copy()
                codec.decode_add(msg, a, got)
                assert _same(got, expect), (codec.name, d, kind)
                fused = acc0.copy()
                codec.encode_add(child, parent, key, a, fused)
                assert _same(fused, expect), (codec.name, d, kind)
                if kind == "nonfinite" and d and not isinstance(codec, TopKCodec):
                    assert np.isnan(dec).any() or np.isinf(dec).any()


def test_encode_vector_matches_encode_with_a_zero_parent():
    x = _vec(D, 4)
    for codec in (TopKCodec(0.1), SignCodec(16), RoundCodec(4, 16), sign(0, "tensor", SIZES)):
        assert np.array_equal(codec.encode_vector(x, None), codec.encode(x, np.zeros_like(x), ()))
    codec = qsgd(4, "tensor", SIZES)
    m1 = codec.encode_vector(x, np.random.default_rng(5))
    assert np.array_equal(m1, codec.encode_vector(x, np.random.default_rng(5))) and m1.size == codec.nbytes(D)
    with pytest.raises(ValueError, match="generator"):
        codec.encode_vector(x, None)


def test_biased_flags():
    assert TopKCodec().biased and SignCodec().biased and RoundCodec(4).biased
    assert not QSGDCodec(4).biased and not qsgd(4, "tensor", SIZES).biased
    assert sign(0, "tensor", SIZES).biased and round_nearest(4, "tensor", SIZES).biased


def test_registered_with_the_factory_rule():
    """Each factory named by its registry entry, called with levels=, bucket= and only the offers
    its signature names (the engine's rule)."""
    offers = {"fraction": 0.05, "tensor_sizes": SIZES}
    made = {}
    for kind in ("qsgd", "topk", "sign", "round"):
        factory = CODECS.resolve(kind)
        params = inspect.signature(factory).parameters
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), kind
        made[kind] = factory(levels=4, bucket="tensor", **{k: v for k, v in offers.items() if k in params})
    assert made["topk"] == TopKCodec(0.05)
    assert [made[k].name for k in ("qsgd", "sign", "round")] == \
        ["qsgd(s=4, bucket=tensor)", "sign(bucket=tensor)", "round(s=4, bucket=tensor)"]
    assert all(made[k].nbytes(D) > 0 for k in made)
    docs = {e.name: e.doc for e in CODECS.entries()}
    assert all(docs[k].startswith("biased") for k in ("topk", "sign", "round")) and docs["qsgd"].startswith("stochastic unbiased")
