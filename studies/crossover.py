"""Row 4 of docs/experiments.md made conditional on the latencies: which N = 2 split of study 1 is most accurate at
the 40 s deadline, for other device-link and cloud-link latencies, from study 1's own runs.

    .venv/bin/python studies/crossover.py > studies/crossover.out     # seconds; needs results/studies/depth/*.h5

The clock is deterministic and the policy waits for every child, so the latencies change when a round ends, never
the model: each split's accuracy after r rounds is its measured curve (mean over the 3 seeds), and the deadline
reads it at the rounds that fit, counted by the same virtual clock the runs used (``ClockModel``).  A latency
setting under which a split would need more rounds than were run is marked "beyond the runs".
"""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate as g  # noqa: E402

SPLITS = [(32, 1), (16, 2), (8, 4), (4, 8), (2, 16), (1, 32)]
DEVICE_LINK = ((1e7, 0.02), (1e8, 0.002), (1e9, 0.0005))  # (bits/s, s): the study's, then faster ones
CLOUD_LATENCY = (0.2, 1.0, 5.0)                            # the cloud link keeps 10 Mbit/s


def curve(name: str) -> np.ndarray:
    """Mean test accuracy after rounds 1, 2, ... over the seeds (as many rounds as every seed ran)."""
    runs = []
    for s in g.SEEDS:
        with h5py.File(g.REPO / "results" / "studies" / "depth" / f"{name}-seed{s}.h5") as f:
            runs.append(f["metrics/test_accuracy"][()])
    n = min(len(r) for r in runs)
    return np.mean([r[:n] for r in runs], axis=0)


def main() -> None:
    from qmlhfl_mpi.analysis.clockfit import ClockModel
    from qmlhfl_mpi.config import load_config

    curves = {t: curve(f"n2-tau{t[0]}-{t[1]}") for t in SPLITS}
    print(f"accuracy at {g.DEPTH_DEADLINE:g} virtual s (%; rounds that fit) per split; the cloud link 10 Mbit/s; "
          "(32, 1) vs (1, 32): which is more accurate; best: among the splits the runs reach (complete: all of them)\n")
    print("| device link | cloud latency s | " + " | ".join(f"{t}" for t in SPLITS) + " | (32,1) vs (1,32) | best |")
    print("|---|---|" + "---|" * len(SPLITS) + "---|---|")
    for rate, l1 in DEVICE_LINK:
        for l2 in CLOUD_LATENCY:
            sets = [f"topology.branching={g.lst([8, 8])}", "quantizer.levels=[4,8]",
                    f"latency.uplink_latency={g.lst([l1, l2])}", f"latency.uplink_rate={g.lst([rate, 1e7])}"]
            cfg = load_config(str(g.REPO / g.BASE), sets)
            clock = ClockModel(cfg, cfg.build_tree(), g.D_MLP200)
            acc: dict[tuple[int, int], float | None] = {}
            cells = []
            for t in SPLITS:
                r = clock.rounds_within(t, g.DEPTH_DEADLINE, cap=10_000)
                c = curves[t]
                acc[t] = float(c[r - 1]) if 0 < r <= len(c) else None
                cells.append(f"{100 * acc[t]:.2f} ({r})" if acc[t] is not None else f"beyond the runs ({r})")
            reached = {t: a for t, a in acc.items() if a is not None}
            best = max(reached, key=lambda t: reached[t]) if reached else None
            a, b = acc[(32, 1)], acc[(1, 32)]
            pair = "-" if a is None or b is None else ("(32, 1)" if a > b else "(1, 32)")
            if a is None and b is not None:
                pair = "(32, 1) (runs more rounds than were run)" if b < max(curves[(32, 1)]) else "?"
            print(f"| {rate / 1e6:g} Mbit/s, {l1:g} s | {l2:g} | " + " | ".join(cells) + f" | {pair} | "
                  f"{best}{'' if len(reached) == len(SPLITS) else ' (of those reached)'} |")


if __name__ == "__main__":
    main()
