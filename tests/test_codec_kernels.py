"""The compiled fused codec against its numpy reference: byte-identical messages and
bit-identical decoded sums for every width, bucket size, ragged tail and non-finite input;
and the counter-based stream it draws from."""
from __future__ import annotations

import numpy as np
import pytest

from codec_cases import LENGTHS, LEVELS, pair
from qmlhfl_mpi.core.codecs.kernels import HAVE_NUMBA
from qmlhfl_mpi.core.codecs.qsgd import QSGDCodec, decode_add_reference, encode_reference, level_bits
from qmlhfl_mpi.core.codecs.stream import key_words, uniforms

# two level counts per level-bit width 1..15: the smallest and the largest of that width,
# so the code widths (sign + level bits) run over 2..16


def test_the_compiled_kernels_are_in_use():
    assert HAVE_NUMBA, "numba is a dependency: the fast path must be active in the test environment"


def test_levels_cover_every_width():
    assert sorted({1 + level_bits(s) for s in LEVELS}) == list(range(2, 17))




@pytest.mark.parametrize("s", LEVELS)
@pytest.mark.parametrize("bucket", [0, 7, 512])
def test_fast_encode_is_byte_identical_to_the_reference(s, bucket):
    codec = QSGDCodec(s, bucket)
    for d in LENGTHS:
        for kind in ("normal", "nonfinite", "zeros"):
            child, parent = pair(d, s * 31 + d, kind)
            key = (7, 4, 2, d % 5, s, bucket)
            fast, ref = codec.encode(child, parent, key), encode_reference(codec, child, parent, key)
            assert fast.dtype == np.uint8 and fast.size == codec.nbytes(d)
            assert np.array_equal(fast, ref), (s, bucket, d, kind)


@pytest.mark.parametrize("s", LEVELS)
@pytest.mark.parametrize("bucket", [0, 7, 512])
def test_fast_decode_add_is_bit_identical_to_the_reference(s, bucket):
    codec = QSGDCodec(s, bucket)
    for d in LENGTHS:
        for kind in ("normal", "nonfinite"):
            acc_fast = np.random.default_rng(d).standard_normal(d).astype(np.float32)
            acc_ref = acc_fast.copy()
            for m, a in enumerate((0.25, 0.5, 0.125, 1 / 3)):  # a parent's weighted sum, in child order
                child, parent = pair(d, 100 * m + s, kind)
                msg = encode_reference(codec, child, parent, (1, m))
                codec.decode_add(msg, np.float32(a), acc_fast)
                decode_add_reference(codec, msg, np.float32(a), acc_ref)
            assert np.array_equal(acc_fast, acc_ref, equal_nan=True), (s, bucket, d, kind)
            if kind == "nonfinite" and d:
                assert np.isnan(acc_fast).any()


def test_decode_add_checks_the_length():
    codec = QSGDCodec(16, 512)
    msg = codec.encode(np.ones(20, np.float32), np.zeros(20, np.float32), (0,))
    with pytest.raises(ValueError, match="expected"):
        codec.decode_add(msg[:-1], np.float32(1), np.zeros(20, np.float32))


def test_encode_of_a_difference_never_needs_the_difference():
    """encode(child, parent) == encode(child - parent, 0): the fused pass forms x - v itself."""
    child, parent = pair(5000, 3)
    codec = QSGDCodec(16, 512)
    assert np.array_equal(codec.encode(child, parent, (9,)), codec.encode(child - parent, np.zeros(5000, np.float32), (9,)))


def test_stream_is_uniform_distinct_and_key_dependent():
    k0, k1 = key_words((1, 4, 2, 3, 0, 0))
    u = uniforms(k0, k1, 0, 1 << 20)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    counts = np.bincount((u * 64).astype(int), minlength=64)
    expected = u.size / 64
    assert ((counts - expected) ** 2 / expected).sum() < 64 + 6 * np.sqrt(2 * 64)  # chi-square, 63 dof, ~6 sigma
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01  # neighbours uncorrelated
    other = uniforms(*key_words((1, 4, 2, 3, 0, 1)), 0, 1 << 20)  # the next call of the same child
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01
    n, N = u.size, 1 << 24  # distinct 24-bit values: as many as the birthday bound expects
    assert abs(np.unique((u * N).astype(np.int64)).size - N * (1 - np.exp(-n / N))) < 2000
    # a slice of the stream is the same numbers: draws depend on (key, index) only
    assert np.array_equal(uniforms(k0, k1, 1000, 1010), u[1000:1010])


def test_key_words_are_validated():
    assert key_words((0,)) != key_words((1,)) and key_words((1, 2)) != key_words((2, 1))
    with pytest.raises(ValueError, match="0 .. 2\\^64-1"):
        key_words((-1,))


@pytest.mark.parametrize("s", LEVELS)
@pytest.mark.parametrize("bucket", [0, 7, 512])
def test_fused_encode_add_equals_decode_add_of_encode(s, bucket):
    """The leader's own children skip the bits: the sum must be the same, bit for bit."""
    codec = QSGDCodec(s, bucket)
    for d in LENGTHS:
        for kind in ("normal", "nonfinite", "zeros"):
            acc_fused = np.random.default_rng(d + 1).standard_normal(d).astype(np.float32)
            acc_bits = acc_fused.copy()
            for m, a in enumerate((0.5, 0.25, 1 / 3)):
                child, parent = pair(d, 7 * m + s, kind)
                codec.encode_add(child, parent, (3, m), np.float32(a), acc_fused)
                decode_add_reference(codec, encode_reference(codec, child, parent, (3, m)), np.float32(a), acc_bits)
            assert np.array_equal(acc_fused, acc_bits, equal_nan=True), (s, bucket, d, kind)


def test_identity_encode_add_equals_decode_add_of_encode():
    from qmlhfl_mpi.core.codecs.identity import IdentityCodec

    codec = IdentityCodec()
    child, parent = pair(1001, 5)
    a, b = np.ones(1001, np.float32), np.ones(1001, np.float32)
    codec.encode_add(child, parent, (0,), np.float32(0.3), a)
    codec.decode_add(codec.encode(child, parent, (0,)), np.float32(0.3), b)
    assert np.array_equal(a, b)
