"""QSGD on torch tensors: the host kernels' messages and sums, computed on the tensors' device.

:class:`TorchQSGD` implements :class:`~qmlhfl_mpi.core.codecs.qsgd.QSGDCodec`
(same wire format, same stream) with torch element-wise operations, each one
float32 operation rounded once, in the order of the kernels of
:mod:`qmlhfl_mpi.core.codecs.kernels`:

* the bucket norm is the kernels' eight-lane sum: lane ``j % 8`` of a bucket
  accumulates its squares row by row (one element-wise add per row of eight,
  over all buckets at once), then the lanes are added in order;
* the stream's hash runs in int64 with every product reduced mod ``2^32``
  (the 32-bit constants split in 16-bit halves, so nothing overflows);
* codes are packed least-significant bit first by expanding them into bits
  and summing each byte's eight weighted bits (integer sums: exact and
  order-free, hence deterministic on a GPU);
* decoding adds ``(level * (norm / s)) * a`` to the accumulator;
* the per-bucket square root and divisions are done in float64 and rounded
  to float32, which is the correctly rounded float32 result (torch's
  vectorised CPU ``sqrt`` is off by one unit in about one value in six).

So a message encoded here is byte-identical to the host's for the same key
(tested on CPU tensors over all widths, buckets, ragged tails and non-finite
inputs), and a sum decoded here is bit-identical.  The norm's row loop has
``ceil(B / 8)`` steps for bucket length ``B``: buckets of more than
``8 * max_rows`` values (``bucket: 0`` on a large model) would make it long,
so those messages are encoded through the host instead (:mod:`.hosted`: the
same bytes, with the difference copied to the host); decoding stays on the
device for every bucket.
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.codecs import StreamKey
from ..core.codecs.qsgd import QSGDCodec
from ..core.codecs.stream import GOLDEN32, MIX1, MIX2, key_words
from .hosted import HostedCodec

__all__ = ["MAX_ROWS", "TorchQSGD", "pack_bits", "uniforms", "unpack_bits"]

MAX_ROWS = 1024  # norm rows (of 8) done on the device: buckets up to 8192 values
MASK32 = 0xFFFFFFFF
INV_2_24 = 1.0 / (1 << 24)


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``a * c mod 2^32`` for int64 ``a`` in ``[0, 2^32)`` and a 32-bit constant ``c``, without overflow."""
    lo = a * (c & 0xFFFF)                        # < 2^48
    hi = ((a * (c >> 16)) & 0xFFFF) << 16        # only the low 16 bits of the high product survive mod 2^32
    return (lo + hi) & MASK32


def uniforms(k0: int, k1: int, n: int, device: torch.device) -> torch.Tensor:
    """The stream's ``u_i``, ``i = 0 .. n-1``, as float32 on ``device`` (see :mod:`~qmlhfl_mpi.core.codecs.stream`)."""
    i = torch.arange(n, dtype=torch.int64, device=device) & MASK32
    h = ((_mul32(i, GOLDEN32) + k0) & MASK32) ^ k1
    h = h ^ (h >> 16)
    h = _mul32(h, MIX1)
    h = h ^ (h >> 15)
    h = _mul32(h, MIX2)
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * INV_2_24  # 24 bits: exact in float32, the product exact too


def pack_bits(codes: torch.Tensor, w: int) -> torch.Tensor:
    """``w``-bit codes (int32) concatenated least-significant bit first into ``ceil(d w / 8)`` bytes."""
    d = codes.numel()
    nbytes = (d * w + 7) // 8
    shifts = torch.arange(w, dtype=torch.int32, device=codes.device)
    bits = ((codes.reshape(-1, 1) >> shifts) & 1).reshape(-1)
    padded = torch.zeros(nbytes * 8, dtype=torch.int32, device=codes.device)
    padded[: d * w] = bits
    weights = torch.arange(8, dtype=torch.int32, device=codes.device)
    return (padded.view(nbytes, 8) << weights).sum(1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, w: int, d: int) -> torch.Tensor:
    """The ``d`` codes (int32) of :func:`pack_bits`' bytes ``data`` (uint8)."""
    shifts = torch.arange(8, dtype=torch.int32, device=data.device)
    bits = ((data.to(torch.int32).reshape(-1, 1) >> shifts) & 1).reshape(-1)[: d * w]
    weights = torch.arange(w, dtype=torch.int32, device=data.device)
    return (bits.view(d, w) << weights).sum(1).to(torch.int32)


def _sumsq8(xb: torch.Tensor) -> torch.Tensor:
    """Per row of ``xb`` (buckets, zero padded), the kernels' eight-lane sum of squares."""
    nb, blen = xb.shape
    rows = -(-blen // 8)
    sq = torch.zeros(nb, rows * 8, dtype=torch.float32, device=xb.device)
    sq[:, :blen] = xb
    sq = (sq * sq).view(nb, rows, 8)
    lanes = sq[:, 0, :].clone()
    for r in range(1, rows):  # each lane in order: one add per row, over every bucket at once
        lanes += sq[:, r, :]
    ss = lanes[:, 0] + lanes[:, 1]
    for j in range(2, 8):
        ss = ss + lanes[:, j]
    return ss


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root (torch's vectorised CPU ``sqrt`` is not): the float64
    root rounded to float32, which is exact rounding (53 >= 2 * 24 + 2 bits)."""
    return torch.sqrt(x.double()).float()


class TorchQSGD:
    """:class:`QSGDCodec` ``host`` on torch vectors (one device): messages are host ``uint8`` arrays.
    Buckets of more than ``8 * max_rows`` values are encoded through the host (``None``: never)."""

    def __init__(self, host: QSGDCodec, device: torch.device | str, max_rows: int | None = MAX_ROWS) -> None:
        self.host, self.device = host, torch.device(device)
        self.levels, self.width = host.levels, host.width
        self.max_rows = max_rows
        self._hosted = HostedCodec(host, self.device)

    def through_host(self, d: int) -> bool:
        """Whether encoding a vector of length ``d`` goes through the host (its buckets' norm loop is too long)."""
        blen = self.host._blocks(d)[1]
        return self.max_rows is not None and -(-blen // 8) > self.max_rows

    @property
    def name(self) -> str:
        return self.host.name

    def nbytes(self, d: int) -> int:
        return self.host.nbytes(d)

    def _codes(self, child: torch.Tensor, parent: torch.Tensor, key: StreamKey
               ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(codes, norms, buckets, bucket length)`` of ``child - parent`` under ``key``."""
        if child.shape != parent.shape:
            raise ValueError(f"child {tuple(child.shape)} and parent {tuple(parent.shape)} differ in shape")
        x = (child.reshape(-1) - parent.reshape(-1))
        d, s = x.numel(), self.levels
        nb, blen = self.host._blocks(d)
        flat = torch.zeros(nb * blen, dtype=torch.float32, device=x.device)
        flat[:d] = x
        xb = flat.view(nb, blen)
        norms = _sqrt(_sumsq8(xb))
        sf = float(s)
        scale = torch.where(norms > 0, (sf / norms.double()).float(), torch.zeros_like(norms))
        k0, k1 = key_words(key)
        y = xb.abs() * scale[:, None]
        y = y + uniforms(k0, k1, nb * blen, x.device).view(nb, blen)
        y = torch.where(torch.isnan(y), torch.zeros_like(y), y)  # inf/nan input: in range; the norm decodes to nan
        level = torch.clamp(y, max=sf).reshape(-1)[:d].to(torch.int32)  # 0 <= y: truncation is floor
        codes = (level << 1) | (x < 0).to(torch.int32)
        return codes, norms, nb, blen

    def encode(self, child: torch.Tensor, parent: torch.Tensor, key: StreamKey) -> np.ndarray:
        """The message for ``child - parent``, packed on the device; only its bytes come to the host."""
        d = child.numel()
        if d == 0:
            return np.empty(self.nbytes(0), dtype=np.uint8)
        if self.through_host(d):
            return self._hosted.encode(child, parent, key)
        codes, norms, _, _ = self._codes(child, parent, key)
        msg = torch.cat([norms.contiguous().view(torch.uint8), pack_bits(codes, self.width)])
        return msg.cpu().numpy()

    def _values(self, codes: torch.Tensor, norms: torch.Tensor, nb: int, blen: int, d: int) -> torch.Tensor:
        """The decoded float32 vector: ``level * (1 - 2 sign)`` times the bucket's ``norm / s``."""
        level = (codes >> 1).to(torch.float32)
        sign = (codes & 1).to(torch.float32)
        vals = torch.zeros(nb * blen, dtype=torch.float32, device=codes.device)
        vals[:d] = level * (1.0 - 2.0 * sign)
        f = (norms.double() / float(self.levels)).float()  # correctly rounded, as float32 division
        return (vals.view(nb, blen) * f[:, None]).reshape(-1)[:d]

    def _parse(self, buf: np.ndarray, d: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        buf = self.host._checked(buf, d)
        nb, blen = self.host._blocks(d)
        data = torch.from_numpy(buf).to(self.device)
        norms = data[: 4 * nb].view(torch.float32)  # little endian, as every CUDA host
        return unpack_bits(data[4 * nb :], self.width, d), norms, nb, blen

    def decode(self, buf: np.ndarray, d: int) -> torch.Tensor:
        """The float32 vector (on the device) a message of :meth:`nbytes` ``(d)`` bytes stands for."""
        if d == 0:
            self.host._checked(buf, 0)
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        return self._values(*self._parse(buf, d), d)

    def decode_add(self, buf: np.ndarray, a: np.float32, acc: torch.Tensor) -> None:
        """``acc += a * decode(buf)`` on the device."""
        d = acc.numel()
        if d == 0:
            self.host._checked(buf, 0)
            return
        acc += self._values(*self._parse(buf, d), d) * float(np.float32(a))

    def encode_add(self, child: torch.Tensor, parent: torch.Tensor, key: StreamKey, a: np.float32,
                   acc: torch.Tensor) -> None:
        """``decode_add(encode(child, parent, key), a, acc)`` without the bits (the same floats)."""
        if not child.numel() == parent.numel() == acc.numel():
            raise ValueError(f"child {child.numel()}, parent {parent.numel()} and accumulator {acc.numel()} "
                             "differ in length")
        d = acc.numel()
        if d == 0:
            return
        if self.through_host(d):
            self._hosted.encode_add(child, parent, key, a, acc)
            return
        codes, norms, nb, blen = self._codes(child, parent, key)
        acc += self._values(codes, norms, nb, blen, d) * float(np.float32(a))
