"""Bit packing of fixed-width integer codes, least-significant bit first (pure numpy).

``pack(codes, w)`` concatenates ``w``-bit codes (``1 <= w <= 16``) into
``ceil(d * w / 8)`` bytes; ``unpack(data, w, d)`` inverts it.  Codes are
processed in byte-aligned groups of ``8 / gcd(w, 8)`` codes.
"""
from __future__ import annotations

import math

import numpy as np


def group(w: int) -> tuple[int, int]:
    """Codes per group and bytes per group so a group is byte aligned."""
    g = 8 // math.gcd(w, 8)
    return g, g * w // 8


def _word(bpg: int) -> tuple[np.dtype, int]:
    """Smallest little-endian unsigned word holding one group (``bpg <= 8``)."""
    for nbytes, dt in ((1, "<u1"), (2, "<u2"), (4, "<u4"), (8, "<u8")):
        if bpg <= nbytes:
            return np.dtype(dt), nbytes
    raise AssertionError(bpg)


def pack(codes: np.ndarray, w: int) -> np.ndarray:
    """Concatenate ``w``-bit codes, least-significant bit first, into bytes."""
    d = codes.size
    g, bpg = group(w)
    ngroups = -(-d // g)
    if ngroups * g != d:
        padded = np.zeros(ngroups * g, dtype=codes.dtype)
        padded[:d] = codes
        codes = padded
    cols = codes.reshape(ngroups, g)
    nout = (d * w + 7) // 8
    if bpg > 8:  # two 64-bit words per group (only odd w >= 9)
        lo = np.zeros(ngroups, dtype="<u8")
        hi = np.zeros(ngroups, dtype="<u8")
        for j in range(g):
            off = j * w
            c = cols[:, j].astype("<u8")
            if off + w <= 64:
                lo |= c << np.uint64(off)
            elif off >= 64:
                hi |= c << np.uint64(off - 64)
            else:
                lo |= c << np.uint64(off)
                hi |= c >> np.uint64(64 - off)
        grouped = np.concatenate(
            [lo.view(np.uint8).reshape(ngroups, 8), hi.view(np.uint8).reshape(ngroups, 8)[:, : bpg - 8]],
            axis=1,
        )
        return grouped.reshape(-1)[:nout]
    dt, wb = _word(bpg)
    word = cols[:, 0].astype(dt)
    for j in range(1, g):
        word |= cols[:, j].astype(dt) << dt.type(j * w)
    if wb == bpg:
        return word.view(np.uint8)[:nout]
    return word.view(np.uint8).reshape(ngroups, wb)[:, :bpg].reshape(-1)[:nout]


def unpack(data: np.ndarray, w: int, d: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``d`` codes of ``w`` bits."""
    g, bpg = group(w)
    ngroups = -(-d // g)
    if data.size != ngroups * bpg:
        flat = np.zeros(ngroups * bpg, dtype=np.uint8)
        flat[: data.size] = data
    else:
        flat = data
    ctype = np.uint8 if w <= 8 else np.uint16
    cols = np.empty((ngroups, g), dtype=ctype)
    if bpg > 8:
        raw = np.zeros((ngroups, 16), dtype=np.uint8)
        raw[:, :bpg] = flat.reshape(ngroups, bpg)
        lo = raw[:, :8].copy().view("<u8").reshape(-1)
        hi = raw[:, 8:].copy().view("<u8").reshape(-1)
        mask = np.uint64((1 << w) - 1)
        for j in range(g):
            off = j * w
            if off + w <= 64:
                c = (lo >> np.uint64(off)) & mask
            elif off >= 64:
                c = (hi >> np.uint64(off - 64)) & mask
            else:
                c = ((lo >> np.uint64(off)) | (hi << np.uint64(64 - off))) & mask
            cols[:, j] = c
        return cols.reshape(-1)[:d]
    dt, wb = _word(bpg)
    if wb == bpg:
        word = np.ascontiguousarray(flat).view(dt)
    else:
        raw = np.zeros((ngroups, wb), dtype=np.uint8)
        raw[:, :bpg] = flat.reshape(ngroups, bpg)
        word = raw.view(dt).reshape(-1)
    mask = dt.type((1 << w) - 1)
    for j in range(g):
        cols[:, j] = (word >> dt.type(j * w)) & mask if j else word & mask
    return cols.reshape(-1)[:d]
