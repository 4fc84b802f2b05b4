"""The cost of planning a round against the virtual clock (docs/system.md), against the round it plans.

    .venv/bin/python benchmarks/clock.py [--devices 10000 100000] [--fraction 0.01] [--rounds 20]
                                         [--engine-rounds 3] [--smoke]

The tree of benchmarks/scale.py (10 regions x 10 edges x D/100 devices, tau = (1, 1, 1), the quickstart
model and codecs), a share ``--fraction`` of every edge's devices drawn per aggregation, on a heterogeneous
system: device speeds lognormal(0.5), a lognormal(0.2) jitter every round, a downlink of 4e7 bits/s on
link 1, and each policy at the edges (all; a deadline of 1.5x the median arrival with at least one child;
first_k = 1), and ``moving``: all, with 10% of the devices moving to another edge every round and edge 0 down
(its devices join its neighbour).  Prints, per size and policy, the median milliseconds of ``RoundScheduler.round`` (drawing the
round, its clock and the kept plan: every rank does this once per round) and, with ``--engine-rounds``, the
median seconds of the whole round as the engine measures it (``time_round``, one rank, in this process)
and the share the plan and clock take of it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICIES = {"all": [], "deadline": ["aggregation.policy=[deadline,all,all]", "aggregation.deadline=[DL,0,0]"],
            "first_k": ["aggregation.policy=[first_k,all,all]", "aggregation.k=[1,0,0]"],
            # the tree of the moment (docs/algorithms.md): 10% of the devices move every round, an edge is down
            "moving": ["mobility.model=random", "mobility.p=0.1", "failures.intervals=[[0,0,1000]]"]}


def sets(devices: int, fraction: float) -> list[str]:
    return [f"topology.branching=[10,10,{max(1, devices // 100)}]", "tau=[1,1,1]", "train.eval_every=1000",
            f"participation.fraction=[{fraction},1,1]", "system.speed=lognormal(0.5)", "system.jitter=lognormal(0.2)",
            "system.down_rate=[4.0e7,0,0]"]


def plan_ms(cfg, rounds: int) -> float:
    """Median milliseconds of one round's plan and clock."""
    from qmlhfl_mpi.analysis.clockfit import ClockModel
    from qmlhfl_mpi.config import build

    clock = ClockModel(cfg, cfg.build_tree(), build.model_dim(cfg))
    timeline, times = clock.scheduler(cfg.tau).timeline(), []
    for _ in range(rounds):
        s = time.perf_counter()
        next(timeline)
        times.append(time.perf_counter() - s)
    return 1e3 * statistics.median(times)


def engine_s(cfg, tmp: Path) -> float:
    """Median seconds per round of the engine on one rank (``time_round``)."""
    import dataclasses

    import h5py
    from mpi4py import MPI

    from qmlhfl_mpi import Session

    out = tmp / "clock.h5"
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, path=str(out)))
    Session(cfg, MPI.COMM_SELF).run(overwrite=True)
    with h5py.File(out) as f:
        return float(statistics.median(f["metrics/time_round"][()].tolist()))


def median_arrival(cfg) -> float:
    from qmlhfl_mpi.analysis.clockfit import ClockModel
    from qmlhfl_mpi.config import build

    clock = ClockModel(cfg, cfg.build_tree(), build.model_dim(cfg))
    timed = clock.scheduler(cfg.tau).round(0)
    ends = [timed.clock.end[i] - timed.clock.start[i] for i, a in enumerate(timed.drawn.aggregations) if a.layer == 1]
    return statistics.median(ends)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=20, help="rounds of the plan and clock timed")
    p.add_argument("--engine-rounds", type=int, default=3, help="rounds the engine runs (0: skip the engine)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (the test suite's run)")
    args = p.parse_args()
    if args.smoke:
        args.devices, args.rounds, args.engine_rounds = [200], 3, 1
    from qmlhfl_mpi import load_config

    print(f"{'devices':>8} {'fraction':>8} {'policy':>9} {'plan+clock_ms':>13} {'round_s':>8} {'share_%':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for devices in args.devices:
            base = sets(devices, args.fraction) + [f"train.rounds={max(args.engine_rounds, 1)}"]
            dl = 1.5 * median_arrival(load_config(str(REPO / "configs" / "quickstart.yaml"), base))
            for policy, extra in POLICIES.items():
                cfg = load_config(str(REPO / "configs" / "quickstart.yaml"),
                                  base + [e.replace("DL", f"{dl:.6g}") for e in extra])
                ms = plan_ms(cfg, args.rounds)
                rs = engine_s(cfg, Path(tmp)) if args.engine_rounds and policy == "all" else float("nan")
                share = 100 * ms / 1e3 / rs  # NaN without the engine
                print(f"{devices:>8} {args.fraction:>8g} {policy:>9} {ms:>13.3f} {rs:>8.3f} {share:>7.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
