"""Compiled, fused QSGD kernels (numba; the numpy reference is in :mod:`.qsgd`).

:func:`qsgd_encode` reads the child's and the parent's model once and writes
the packed message: per bucket, one pass for the norm of ``child - parent``
and one pass (over the same, cache-resident bucket) that draws the
counter-based uniforms of :mod:`.stream`, rounds, and writes the bucket's
codes, then packs them; the difference is never stored as a vector.  The
norm is a sum in eight fixed lanes (:func:`_sumsq8`), which keeps eight
independent additions in flight and is reproduced exactly by the reference.  :func:`qsgd_decode_add` reads a
message once and adds ``a * decoded`` into the parent's float32 accumulator.
Both follow the reference's float32 operations in the same order (no
fused multiply-add, no reassociation), so messages are byte-identical and
sums bit-identical to :func:`.qsgd.encode_reference` /
:func:`.qsgd.decode_add_reference`, which the tests check.

``HAVE_NUMBA`` is False where numba cannot be imported (or on a big-endian host: the
kernels store native 32-bit words); the codec then uses
the numpy reference (same results, slower).  Compiled code is cached on
disk beside this module (numba ``cache=True``), so a process compiles a
kernel only the first time it ever runs.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from .stream import GOLDEN32, INV_2_24, MIX1, MIX2

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None  # type: ignore[assignment]

HAVE_NUMBA = numba is not None and sys.byteorder == "little"  # the kernels store native words

__all__ = ["HAVE_NUMBA", "qsgd_decode_add", "qsgd_encode", "qsgd_quantize_add"]


def _jit(fn: Callable[..., Any], inline: Literal["never", "always"] = "never") -> Any:
    if numba is None:  # pragma: no cover
        return None
    return numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline=inline)(fn)


def _sumsq8(child: np.ndarray, parent: np.ndarray, lo: int, n: int) -> np.float32:
    """``sum((child - parent)^2)`` over ``lo .. lo+n-1`` in the fixed order of the reference:
    eight float32 lanes (element ``j`` of the bucket into lane ``j % 8``), each summed in
    order, then the lanes added in order."""
    z = np.float32(0.0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
    full = n - n % 8
    for j in range(lo, lo + full, 8):
        t0 = child[j] - parent[j]
        t1 = child[j + 1] - parent[j + 1]
        t2 = child[j + 2] - parent[j + 2]
        t3 = child[j + 3] - parent[j + 3]
        t4 = child[j + 4] - parent[j + 4]
        t5 = child[j + 5] - parent[j + 5]
        t6 = child[j + 6] - parent[j + 6]
        t7 = child[j + 7] - parent[j + 7]
        a0 += t0 * t0
        a1 += t1 * t1
        a2 += t2 * t2
        a3 += t3 * t3
        a4 += t4 * t4
        a5 += t5 * t5
        a6 += t6 * t6
        a7 += t7 * t7
    r = n - full
    j = lo + full
    if r > 0:
        t = child[j] - parent[j]
        a0 += t * t
    if r > 1:
        t = child[j + 1] - parent[j + 1]
        a1 += t * t
    if r > 2:
        t = child[j + 2] - parent[j + 2]
        a2 += t * t
    if r > 3:
        t = child[j + 3] - parent[j + 3]
        a3 += t * t
    if r > 4:
        t = child[j + 4] - parent[j + 4]
        a4 += t * t
    if r > 5:
        t = child[j + 5] - parent[j + 5]
        a5 += t * t
    if r > 6:
        t = child[j + 6] - parent[j + 6]
        a6 += t * t
    ss = a0 + a1
    ss = ss + a2
    ss = ss + a3
    ss = ss + a4
    ss = ss + a5
    ss = ss + a6
    return ss + a7


def _uniform(j: int, base: np.uint32, u1: np.uint32) -> np.float32:
    """The stream's ``u`` of the bucket's ``j``-th coordinate (``base = lo * GOLDEN32 + k0``): the
    counter-based hash of :mod:`.stream`, its top 24 bits as an exact float32 in ``[0, 1)``."""
    g, m1, m2 = np.uint32(GOLDEN32), np.uint32(MIX1), np.uint32(MIX2)
    s16, s15, s8 = np.uint32(16), np.uint32(15), np.uint32(8)
    # numba widens small unsigned arithmetic: cast back to 32 bits after every step
    h = np.uint32(np.uint32(np.uint32(j) * g + base) ^ u1)
    h = np.uint32(h ^ (h >> s16))
    h = np.uint32(h * m1)
    h = np.uint32(h ^ (h >> s15))
    h = np.uint32(h * m2)
    h = np.uint32(h ^ (h >> s16))
    return np.float32(np.int32(h >> s8)) * np.float32(INV_2_24)  # h >> 8 < 2^24: exact as int32


def _bucket_codes(child: np.ndarray, parent: np.ndarray, lo: int, n: int, scale: np.float32, finite: bool,
                  sf: np.float32, k0: int, k1: int, codes: np.ndarray) -> None:
    """The codes ``level << 1 | sign`` of coordinates ``lo .. lo+n-1`` into ``codes[:n]``: the
    counter-based draw of :mod:`.stream`, ``level = min(floor(|x| scale + u), s)``, sign ``x < 0``.

    With a finite norm every ``|x| scale + u`` lies in ``[0, s + 1)``, so the loop needs no NaN test
    and converts through int32 (exact there); without the branch and with the bucket's slices
    (indices known non-negative) LLVM vectorises it.  A non-finite norm takes the guarded loop."""
    zero = np.float32(0.0)
    one = np.uint32(1)
    u1 = np.uint32(k1)
    base = np.uint32(np.uint32(lo) * np.uint32(GOLDEN32) + np.uint32(k0))  # coordinate i hashes i * g + k0
    cb = child[lo:lo + n]
    pb = parent[lo:lo + n]
    if finite:
        for j in range(n):
            t = cb[j] - pb[j]
            y = abs(t) * scale + uniform(j, base, u1)
            level = np.uint32(np.int32(min(y, sf)))  # 0 <= y < s + 1: truncation as for uint32
            codes[j] = (level << one) | (one if t < zero else np.uint32(0))
        return
    for j in range(n):
        t = cb[j] - pb[j]
        y = abs(t) * scale + uniform(j, base, u1)
        if math.isnan(y):  # inf/nan input: keep the code in range; the norm decodes to nan
            y = zero
        codes[j] = (np.uint32(min(y, sf)) << one) | (one if t < zero else np.uint32(0))


def _add_codes(codes: np.ndarray, n: int, f: np.float32, a: np.float32, acc: np.ndarray, lo: int) -> None:
    """``acc[lo + j] += a * (level_j * f)`` for the codes ``codes[:n]`` of one bucket
    (``f = norm / s``; the sign applied exactly, as a factor +-1).  Shared by both consumers
    of codes, so the fused path and the decoder add the same floats."""
    one, two, onef = np.uint32(1), np.float32(2.0), np.float32(1.0)
    ab = acc[lo:lo + n]
    for j in range(n):
        c = codes[j]
        v = np.float32(np.int32(c >> one)) * (onef - two * np.float32(np.int32(c & one)))  # levels < 2^15
        ab[j] += (v * f) * a


def _encode(child: np.ndarray, parent: np.ndarray, s: int, blen: int, nb: int, w: int, k0: int, k1: int,
            out: np.ndarray) -> None:
    d = child.size
    norms = out[: 4 * nb].view(np.float32)
    nwords = (d * w) // 32  # whole little-endian 32-bit words of codes; the rest (< 4 bytes) byte by byte
    words = out[4 * nb: 4 * nb + 4 * nwords].view(np.uint32)
    codes = np.empty(blen, dtype=np.uint32)
    sf = np.float32(s)
    zero = np.float32(0.0)
    uw, w2 = np.uint64(w), 2 * w  # w <= 16: a pair of codes is at most 32 bits
    bits = np.uint64(0)
    nbits = 0
    wi = 0
    for b in range(nb):
        lo = b * blen
        n = min(blen, d - lo)
        norm = np.float32(math.sqrt(sumsq8(child, parent, lo, n)))
        norms[b] = norm
        finite = math.isfinite(norm)
        scale = sf / norm if norm > zero else zero
        bucket_codes(child, parent, lo, n, scale, finite, sf, k0, k1, codes)
        full = n - n % 2
        for j in range(0, full, 2):  # two codes joined first (2w <= 32 bits): half the pushes and tests
            bits, nbits, wi = push(np.uint64(codes[j]) | (np.uint64(codes[j + 1]) << uw), w2, bits, nbits, words, wi)
        if full < n:
            bits, nbits, wi = push(np.uint64(codes[full]), w, bits, nbits, words, wi)
    pos = 4 * nb + 4 * nwords
    while nbits > 0:
        out[pos] = np.uint8(bits & np.uint64(0xFF))
        bits >>= np.uint64(8)
        nbits -= 8
        pos += 1


def _refill(buf: np.ndarray, pos: int, bits: np.uint64, nbits: int) -> tuple[int, np.uint64, int]:
    """Appends the next 32 bits of ``buf`` at ``pos`` above the ``nbits < 32`` held in ``bits`` (byte by
    byte near the end of the message); returns the new ``(pos, bits, nbits)``."""
    if pos + 4 <= buf.size:
        bits |= ((np.uint64(buf[pos]) | (np.uint64(buf[pos + 1]) << np.uint64(8))
                  | (np.uint64(buf[pos + 2]) << np.uint64(16))
                  | (np.uint64(buf[pos + 3]) << np.uint64(24))) << np.uint64(nbits))
        return pos + 4, bits, nbits + 32
    while nbits <= 56 and pos < buf.size:
        bits |= np.uint64(buf[pos]) << np.uint64(nbits)
        nbits += 8
        pos += 1
    return pos, bits, nbits


def _push(value: np.uint64, width: int, bits: np.uint64, nbits: int, words: np.ndarray,
          wi: int) -> tuple[np.uint64, int, int]:
    """Appends ``width <= 32`` bits of ``value`` above the ``nbits < 32`` held in ``bits``, storing a full
    32-bit word at ``words[wi]``; returns the new ``(bits, nbits, wi)`` (the encoder's side of
    :func:`_refill`)."""
    bits |= value << np.uint64(nbits)
    nbits += width
    if nbits >= 32:
        words[wi] = np.uint32(bits & np.uint64(0xFFFFFFFF))
        return bits >> np.uint64(32), nbits - 32, wi + 1
    return bits, nbits, wi


def _decode_add(buf: np.ndarray, s: int, blen: int, nb: int, w: int, a: np.float32, acc: np.ndarray) -> None:
    d = acc.size
    sf = np.float32(s)
    word = np.empty(1, dtype=np.uint32)
    as_float = word.view(np.float32)
    codes = np.empty(blen, dtype=np.uint32)
    uw, w2 = np.uint64(w), 2 * w  # codes are taken two at a time (2w <= 32 bits), as the encoder packs them
    mask = np.uint64((1 << w) - 1)
    bits = np.uint64(0)
    nbits = 0
    pos = 4 * nb
    for b in range(nb):
        q = 4 * b
        word[0] = (np.uint32(buf[q]) | (np.uint32(buf[q + 1]) << np.uint32(8))
                   | (np.uint32(buf[q + 2]) << np.uint32(16)) | (np.uint32(buf[q + 3]) << np.uint32(24)))
        f = as_float[0] / sf
        lo = b * blen
        n = min(blen, d - lo)
        full = n - n % 2
        for j in range(0, full, 2):  # unpack the bucket's codes
            if nbits < w2:
                pos, bits, nbits = refill(buf, pos, bits, nbits)
            codes[j] = np.uint32(bits & mask)
            codes[j + 1] = np.uint32((bits >> uw) & mask)
            bits >>= np.uint64(w2)
            nbits -= w2
        if full < n:
            if nbits < w:
                pos, bits, nbits = refill(buf, pos, bits, nbits)
            codes[full] = np.uint32(bits & mask)
            bits >>= uw
            nbits -= w
        add_codes(codes, n, f, a, acc, lo)


sumsq8 = _jit(_sumsq8)
uniform = _jit(_uniform, inline="always")
bucket_codes = _jit(_bucket_codes, inline="always")  # helpers of two kernels each, inlined into them
add_codes = _jit(_add_codes, inline="always")
refill = _jit(_refill, inline="always")
push = _jit(_push, inline="always")
def _quantize_add(child: np.ndarray, parent: np.ndarray, s: int, blen: int, nb: int, k0: int, k1: int,
                  a: np.float32, acc: np.ndarray) -> None:
    """``acc += a * decode(encode(child, parent))`` without the bits in between: the same
    norm and codes as :func:`_encode`, the same arithmetic as :func:`_decode_add`."""
    d = child.size
    sf = np.float32(s)
    zero = np.float32(0.0)
    codes = np.empty(blen, dtype=np.uint32)
    for b in range(nb):
        lo = b * blen
        n = min(blen, d - lo)
        norm = np.float32(math.sqrt(sumsq8(child, parent, lo, n)))
        scale = sf / norm if norm > zero else zero
        bucket_codes(child, parent, lo, n, scale, math.isfinite(norm), sf, k0, k1, codes)
        f = norm / sf
        add_codes(codes, n, f, a, acc, lo)  # the sum, exactly as _decode_add makes it


qsgd_encode = _jit(_encode)
qsgd_quantize_add = _jit(_quantize_add)
qsgd_decode_add = _jit(_decode_add)
