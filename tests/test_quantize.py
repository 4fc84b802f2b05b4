"""Quantizer: wire format, unbiasedness, variance bound, exact byte length."""
import math

import numpy as np
import pytest

from qmlhfl_mpi.core.codecs import make_codec
from qmlhfl_mpi.core.codecs.identity import IdentityCodec
from qmlhfl_mpi.core.codecs.qsgd import (
    QSGDCodec,
    level_bits,
    qsgd_nbytes,
    variance_factor,
)


def formula_nbytes(d, s, bucket):
    nb = 0 if d == 0 else (1 if bucket == 0 or bucket >= d else math.ceil(d / bucket))
    return 4 * nb + math.ceil(d * (1 + math.ceil(math.log2(s + 1))) / 8)


@pytest.mark.parametrize("s", [1, 2, 3, 4, 7, 8, 15, 16, 100, 255, 256, 1000, 4095, 32767])
@pytest.mark.parametrize("d", [0, 1, 5, 8, 63, 64, 513, 2000])
@pytest.mark.parametrize("bucket", [0, 1, 7, 512])
def test_byte_length_equals_formula_and_round_trip_is_consistent(s, d, bucket):
    codec = QSGDCodec(s, bucket)
    x = np.random.default_rng(d * 7 + s).standard_normal(d).astype(np.float32)
    msg = codec.encode_vector(x, np.random.default_rng(1))
    assert msg.dtype == np.uint8
    assert msg.size == codec.nbytes(d) == qsgd_nbytes(d, s, bucket) == formula_nbytes(d, s, bucket)
    y = codec.decode(msg, d)
    assert y.dtype == np.float32 and y.shape == (d,)
    # every decoded coordinate is sign(x_i) * norm * l / s with an integer 0 <= l <= s
    blen = d if bucket == 0 or bucket >= d else bucket
    for k in range(0, d, max(blen, 1)):
        xb, yb = x[k:k + blen], y[k:k + blen]
        norm = np.float32(np.sqrt(np.sum(xb.astype(np.float32) ** 2, dtype=np.float32)))
        levels = np.abs(yb) * s / norm
        tol = 1e-3 + 1e-5 * s  # float32 rounding grows with s
        assert np.allclose(levels, np.round(levels), atol=tol)
        assert levels.max() <= s + tol
        # the level is floor or ceil of s|x|/norm
        exact = np.abs(xb) * s / norm
        assert np.all(levels >= np.floor(exact) - tol) and np.all(levels <= np.ceil(exact) + tol)
        assert np.all(np.sign(yb) * np.sign(xb) >= 0)


def test_decode_rejects_wrong_length():
    codec = QSGDCodec(4, 8)
    msg = codec.encode_vector(np.ones(20, np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="expected"):
        codec.decode(msg[:-1], 20)


@pytest.mark.parametrize("s,bucket", [(1, 0), (2, 16), (5, 0), (16, 8)])
def test_unbiased(s, bucket):
    d = 40
    x = np.random.default_rng(3).standard_normal(d).astype(np.float32)
    codec = QSGDCodec(s, bucket)
    trials = 8000
    samples = np.stack([codec.decode(codec.encode_vector(x, np.random.default_rng(i)), d) for i in range(trials)])
    mean = samples.mean(0)
    stderr = samples.std(0) / np.sqrt(trials) + 1e-7
    # each coordinate within 5 standard errors of the truth; and overall chi-square-like check
    assert np.all(np.abs(mean - x) < 5 * stderr + 1e-6)
    assert np.mean(((mean - x) / stderr) ** 2) < 2.0


@pytest.mark.parametrize("s,bucket,d", [(1, 0, 64), (4, 0, 256), (4, 32, 256), (16, 512, 4096), (255, 0, 1000)])
def test_variance_bound_holds_empirically(s, bucket, d):
    rng = np.random.default_rng(11)
    codec = QSGDCodec(s, bucket)
    for x in (rng.standard_normal(d), rng.standard_cauchy(d), np.eye(1, d, 3)[0]):
        x = x.astype(np.float32)
        errs = [np.sum((codec.decode(codec.encode_vector(x, np.random.default_rng(i)), d) - x) ** 2) for i in range(300)]
        q = variance_factor(d, s, bucket)
        assert q == pytest.approx(min((bucket or d) / s**2, math.sqrt(bucket or d) / s))
        assert np.mean(errs) <= q * np.sum(x.astype(np.float64) ** 2) * 1.05 + 1e-9


def test_zero_vector_round_trips_to_zeros():
    for bucket in (0, 4):
        codec = QSGDCodec(8, bucket)
        y = codec.decode(codec.encode_vector(np.zeros(10, np.float32), np.random.default_rng(0)), 10)
        assert np.all(y == 0) and not np.isnan(y).any()
    # a zero bucket inside a non-zero vector stays zero too
    x = np.zeros(12, np.float32)
    x[:4] = 1.0
    y = QSGDCodec(8, 4).decode(QSGDCodec(8, 4).encode_vector(x, np.random.default_rng(0)), 12)
    assert np.all(y[4:] == 0) and np.all(np.isfinite(y))


def test_deterministic_for_a_generator_and_different_for_another():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    c = QSGDCodec(4, 64)
    a = c.encode_vector(x, np.random.default_rng(5))
    assert np.array_equal(a, c.encode_vector(x, np.random.default_rng(5)))
    assert not np.array_equal(a, c.encode_vector(x, np.random.default_rng(6)))


def test_none_codec_is_exact_float32():
    x = np.random.default_rng(0).standard_normal(33).astype(np.float32)
    c = make_codec(0, 512)
    assert isinstance(c, IdentityCodec)
    msg = c.encode_vector(x)
    assert msg.size == c.nbytes(33) == 4 * 33
    assert np.array_equal(c.decode(msg, 33), x)
    assert c.variance(33) == 0.0


@pytest.mark.parametrize("bad", [0, -1, 32768])
def test_level_range_is_checked(bad):
    with pytest.raises(ValueError, match="levels"):
        level_bits(bad)


def test_bucket_reduces_error_as_designed():
    """docs/algorithm.md section 4: one norm per 512 values is far more accurate than one global norm at s=16."""
    d = 200_000
    x = np.random.default_rng(2).standard_normal(d).astype(np.float32)
    rel = {}
    for bucket in (0, 512):
        c = QSGDCodec(16, bucket)
        y = c.decode(c.encode_vector(x, np.random.default_rng(0)), d)
        rel[bucket] = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel[512] < 0.7 < rel[0]
    assert QSGDCodec(16, 512).nbytes(d) < 1.02 * QSGDCodec(16, 0).nbytes(d)
