"""Batched (``train.vectorize: on``) against one-device-at-a-time local SGD, by model size.

    .venv/bin/python benchmarks/vectorize.py [--devices 64] [--steps 5] [--batch 32] [--smoke]

Trains ``--devices`` devices from one start model with the engine's two
trainers (:class:`LocalTrainer`, :class:`VectorTrainer`) on random data and
prints the median time per device-step of each (3 repeats) and the speed-up,
for MLPs from 1.4 k to 199 k parameters.  One torch thread; run on an idle
core.  ``train.vectorize: auto`` switches batching on below
``qmlhfl_mpi.learning.vectorized.AUTO_MAX_PARAMS``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from qmlhfl_mpi.learning.models import build_model, num_parameters
from qmlhfl_mpi.learning.train import LocalTrainer
from qmlhfl_mpi.learning.vectorized import AUTO_MAX_PARAMS, VectorTrainer

SIZES = [(60, 16), (60, 64), (60, 128), (60, 200), (784, 100), (784, 200)]  # (inputs, hidden)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = SIZES[:1] if args.smoke else SIZES
    D = 4 if args.smoke else args.devices
    print(f"{D} devices, {args.steps} steps, batch {args.batch}; auto batches below {AUTO_MAX_PARAMS} parameters")
    print(f"{'params':>8} {'one-by-one us':>14} {'batched us':>11} {'speed-up':>9}")
    for inputs, hidden in sizes:
        params, one, batched = measure(inputs, hidden, D, args.steps, args.batch, args.repeat)
        print(f"{params:>8} {one * 1e6:>14.0f} {batched * 1e6:>11.0f} {one / batched:>8.2f}x", flush=True)


def median_per_step(fn: Callable[[], object], repeat: int, steps: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) / steps


def measure(inputs: int, hidden: int, D: int, steps: int, batch: int, repeat: int) -> tuple[int, float, float]:
    """(parameters, seconds per device-step one by one, batched)."""
    model = build_model("mlp", (inputs,), 10, args={"hidden": hidden}, seed=0)
    base = LocalTrainer(model, 0.05, batch, seed=0)
    vec = VectorTrainer(base)
    g = np.random.default_rng(0)
    data = [(torch.from_numpy(g.standard_normal((2 * batch, inputs)).astype(np.float32)),
             torch.from_numpy(g.integers(0, 10, 2 * batch))) for _ in range(D)]
    v = base.get_vector()

    def one_by_one() -> None:
        for d, (x, y) in enumerate(data):
            base.train(v, x, y, steps, d, 0, 0)

    def batched() -> None:
        vec.train_many(v, data, steps, list(range(D)), 0, [0] * D, range(D))

    return (num_parameters(model), median_per_step(one_by_one, repeat, D * steps),
            median_per_step(batched, repeat, D * steps))


if __name__ == "__main__":
    main()
