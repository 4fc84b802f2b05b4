"""Scale: 10^3 .. 10^5 synthetic devices on 2 ranks -- start-up, seconds per round, peak memory per rank
against the memory check's estimate.

    .venv/bin/python benchmarks/scale.py [--devices 1000 10000 100000] [--fraction 0.01] [--ranks 2] [--rounds 3]
                                         [--smoke]

The quickstart model (MLP 60-64-64-10) on the embedded Synthetic(1, 1) data
(median 200 samples a device), a three-layer tree (10 regions x 10 edges x
D/100 devices), tau = (1, 1, 1), QSGD s = (4, 16, 64), a share ``--fraction``
of every edge's devices drawn in each round (``participation.fraction`` on
link 1; 1 = full participation), ``train.vectorize: auto``.  Prints the start-up time
(wall time before the first round: Python, MPI, data generation, model),
the median seconds per round, each rank's peak RSS after set-up and at the
end, and the estimate of the busiest rank's peak that the memory check uses
(``qmlhfl_mpi.config.sizing.memory_estimate``) with the measured/estimated ratio.
Memory per rank grows with the devices the rank hosts (their data)
and, much more slowly, with the total (per-device sample counts, per-device
losses and step counts: a few float64 arrays of length D).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]


def run(devices: int, ranks: int, rounds: int, fraction: float, tmp: Path) -> dict[str, float]:
    from qmlhfl_mpi import load_config
    from qmlhfl_mpi.config.sizing import memory_estimate

    out, mem = tmp / f"scale-{devices}.h5", tmp / f"mem-{devices}.json"
    leaf = max(1, devices // 100)
    run_sets = [f"output.path={out}", f"topology.branching=[10,10,{leaf}]", "tau=[1,1,1]", f"train.rounds={rounds}",
                f"participation.fraction=[{fraction}, 1, 1]", "train.eval_every=1000"]
    estimate = memory_estimate(load_config(str(REPO / "configs" / "quickstart.yaml"), run_sets), ranks).total
    sets = [*run_sets, f"callbacks=[{{ref: '{REPO / 'benchmarks' / 'memory_probe.py'}:PeakMemory', "
                       f"args: {{path: '{mem}'}}}}]"]
    cmd = [str(Path(sys.executable).with_name("mpiexec")), "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi",
           "run", str(REPO / "configs" / "quickstart.yaml"), "--quiet", "--overwrite", "--log-level", "WARNING"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    rows = json.loads(mem.read_text())
    with h5py.File(out) as f:
        rounds_s = f["metrics/time_round"][()]
    return {"devices": 100 * leaf, "startup_s": min(r["run_start_unix"] for r in rows) - t0,
            "round_s": float(statistics.median(rounds_s[1:] if len(rounds_s) > 1 else rounds_s)),
            "rss_setup": [round(r["peak_rss_mb_after_setup"]) for r in rows],
            "rss_end": [round(r["peak_rss_mb"]) for r in rows], "hosted": [r["devices"] for r in rows],
            "estimate_mb": estimate / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.01, help="participation.fraction on link 1 (1 = everyone)")
    ap.add_argument("--smoke", action="store_true", help="100 devices, one round")
    args = ap.parse_args()
    sizes, rounds = ([100], 1) if args.smoke else (args.devices, args.rounds)
    print(f"{'devices':>8} {'ranks':>5} {'fraction':>8} {'startup_s':>9} {'round_s':>8} {'hosted per rank':>16} "
          f"{'peak RSS after set-up, MB':>26} {'peak RSS at end, MB':>20} {'estimate, MB':>12} {'measured/est':>12}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for D in sizes:
            r = run(D, args.ranks, rounds, args.fraction, Path(tmp))
            print(f"{r['devices']:>8} {args.ranks:>5} {args.fraction:>8g} {r['startup_s']:>9.1f} {r['round_s']:>8.2f} "
                  f"{str(r['hosted']):>16} {str(r['rss_setup']):>26} {str(r['rss_end']):>20} "
                  f"{r['estimate_mb']:>12.0f} {max(r['rss_end']) / r['estimate_mb']:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
