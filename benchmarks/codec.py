"""Encode/decode throughput of the uplink codecs (MB/s of float32 input).

    .venv/bin/python benchmarks/codec.py [--d 1000000] [--repeat 9]

Prints the median over repeats for s in {1, 4, 16, 255} and bucket in {0, 512},
the float32 identity, and a plain numpy copy of the same array for scale.
Single-threaded numpy; run on an otherwise idle core for stable numbers.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from qmlhfl_mpi.core.codecs.identity import IdentityCodec
from qmlhfl_mpi.core.codecs.qsgd import QSGDCodec


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    d, rep = args.d, args.repeat
    x = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    mb = x.nbytes / 1e6
    copy_s = median_seconds(x.copy, rep)
    print(f"d = {d}, input {mb:.1f} MB, median of {rep}")
    print(f"{'codec':<26} {'encode MB/s':>12} {'decode MB/s':>12} {'bytes':>10} {'ratio':>6} {'rel.err':>8}")
    print(f"{'numpy copy (scale)':<26} {mb / copy_s:>12.0f} {'':>12} {x.nbytes:>10} {1.0:>6.2f}")
    codecs = [IdentityCodec()] + [QSGDCodec(s, b) for s in (1, 4, 16, 255) for b in (0, 512)]
    for c in codecs:
        g = np.random.default_rng(1)
        msg = c.encode_vector(x, g)
        enc = median_seconds(lambda c=c, g=g: c.encode_vector(x, g), rep)
        dec = median_seconds(lambda c=c, msg=msg: c.decode(msg, d), rep)
        y = c.decode(msg, d)
        err = float(np.linalg.norm(y - x) / np.linalg.norm(x))
        print(f"{c.name:<26} {mb / enc:>12.0f} {mb / dec:>12.0f} {msg.size:>10} {x.nbytes / msg.size:>6.2f} {err:>8.3f}")


if __name__ == "__main__":
    main()
