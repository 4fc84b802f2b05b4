"""Throughput of the link codecs: the compiled fused path against the numpy reference.

    .venv/bin/python benchmarks/codec.py [--d 1663370] [--repeat 15] [--levels 1 4 16 255] [--bucket 512]

For each number of levels: encode from two models (``child``, ``parent`` ->
message) and decode-accumulate (``acc += a * decode(message)``), both in GB/s
of float32 input (``4 d`` bytes: one model's worth), medians over repeats,
next to the memory floor -- a plain ``child - parent`` over the same arrays --
and the numpy reference (the same bytes, computed with numpy; before 0.2.0
this was the engine's only path).  One thread; run on an otherwise idle core.
The default ``d`` is the FedAvg CNN's 1,663,370 parameters (6.7 MB a model:
out of L2).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from qmlhfl_mpi.core.codecs.identity import IdentityCodec
from qmlhfl_mpi.core.codecs.qsgd import QSGDCodec, decode_add_reference, encode_reference


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (and compilation, the first time)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1_663_370)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 255])
    ap.add_argument("--bucket", type=int, default=512)
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) numpy reference")
    args = ap.parse_args()
    d, rep = args.d, args.repeat
    g = np.random.default_rng(0)
    child, parent = g.standard_normal(d).astype(np.float32), g.standard_normal(d).astype(np.float32)
    gb = 4 * d / 1e9
    floor = median_seconds(lambda: child - parent, rep)
    print(f"d = {d} ({4 * d / 1e6:.1f} MB per model), bucket {args.bucket}, median of {rep}")
    print(f"memory floor: child - parent {gb / floor:6.2f} GB/s ({floor * 1e3:.2f} ms)")
    print(f"{'codec':<24} {'encode GB/s':>11} {'decode+acc GB/s':>15} {'enc/floor':>9} {'ref enc':>8} "
          f"{'ref dec':>8} {'bytes':>9} {'rel.err':>7}")
    codecs = [QSGDCodec(s, args.bucket) for s in args.levels] + [IdentityCodec()]
    key = (1, 4, 1, 0, 0, 0)
    acc = np.zeros(d, dtype=np.float32)
    for c in codecs:
        msg = c.encode(child, parent, key)
        enc = median_seconds(lambda c=c: c.encode(child, parent, key), rep)
        dec = median_seconds(lambda c=c, m=msg: c.decode_add(m, np.float32(0.5), acc), rep)
        ref_enc = ref_dec = float("nan")
        if isinstance(c, QSGDCodec) and not args.no_reference:
            r = max(3, rep // 5)
            ref_enc = gb / median_seconds(lambda c=c: encode_reference(c, child, parent, key), r)
            ref_dec = gb / median_seconds(lambda c=c, m=msg: decode_add_reference(c, m, np.float32(0.5), acc), r)
        y = c.decode(msg, d)
        err = float(np.linalg.norm(y - (child - parent)) / np.linalg.norm(child - parent))
        print(f"{c.name:<24} {gb / enc:>11.2f} {gb / dec:>15.2f} {enc / floor:>9.1f} {ref_enc:>8.2f} "
              f"{ref_dec:>8.2f} {msg.size:>9} {err:>7.3f}")


if __name__ == "__main__":
    main()
