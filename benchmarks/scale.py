"""Scale: 10^3 .. 10^6 synthetic devices at equal drawn work on 2 ranks -- start-up, seconds per round, peak
memory per rank (against the memory check's estimate) and the results file's size.

    .venv/bin/python benchmarks/scale.py [--devices 1000 10000 100000 1000000] [--tau 1,1,1 5,2,2]
                                         [--ranks 2] [--rounds 4] [--smoke] [--profile DEVICES]

The quickstart model (MLP 60-64-64-10) on the embedded Synthetic(1, 1) data
(median 200 samples a device), a three-layer tree of 10 regions x 10 edges x
D/100 devices, QSGD s = (4, 16, 64), ``train.vectorize: auto``.  Every row
does the same drawn work: each edge aggregation draws 10 of its D/100 devices
(``participation.fraction`` 1000/D on link 1), so a round trains
``100 * 10 * tau_2 * tau_3`` local runs of ``tau_1`` steps whatever D is.  The
test set is the held-out part of 1,000 devices (``data.test_devices``),
evaluated once, in the last round.  Prints, per row: the start-up (wall time
before the first round: Python, MPI, the sample counts, the test set, the
model), the median seconds of rounds 2.. (so the first round's cache fill does
not count), its ratio to the 10^3-device row of the same tau, each rank's peak
RSS at the end, the memory check's estimate of the busiest rank, and the
results file's size scaled to 100 rounds (measured size, minus the per-round
rows, plus 100 of them).  ``--profile D`` runs one rank of D devices under
cProfile instead and prints where a round's time goes; ``--cache-mb 0`` makes
every row make its drawn devices' data each time they are drawn (the 10^3 row
then pays for its data as the larger rows do).
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
DRAWN_PER_EDGE = 10
TEST_DEVICES = 1000


def settings(devices: int, tau: str, rounds: int, out: Path, cache_mb: float | None = None) -> list[str]:
    leaf = max(1, devices // 100)
    fraction = min(1.0, DRAWN_PER_EDGE / leaf)
    return [*([f"data.cache_mb={cache_mb}"] if cache_mb is not None else []),
            f"output.path={out}", f"topology.branching=[10,10,{leaf}]", f"tau=[{tau}]", f"train.rounds={rounds}",
            f"participation.fraction=[{fraction!r}, 1, 1]", "train.eval_every=1000",
            f"data.test_devices={TEST_DEVICES}", "output.checkpoint_every=0"]


def run(devices: int, tau: str, ranks: int, rounds: int, tmp: Path, cache_mb: float | None = None
        ) -> dict[str, object]:
    from qmlhfl_mpi import load_config
    from qmlhfl_mpi.config.sizing import memory_estimate

    out, mem = tmp / f"scale-{devices}.h5", tmp / f"mem-{devices}.json"
    run_sets = settings(devices, tau, rounds, out, cache_mb)
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
        per_round = sum(f["metrics"][k].id.get_storage_size() for k in f["metrics"]) / max(len(rounds_s), 1)
    size = out.stat().st_size
    return {"devices": 100 * max(1, devices // 100), "startup_s": min(r["run_start_unix"] for r in rows) - t0,
            "round_s": float(statistics.median(rounds_s[1:] if len(rounds_s) > 1 else rounds_s)),
            "rss_end": [round(r["peak_rss_mb"]) for r in rows], "estimate_mb": estimate / 2**20,
            "file_mb_100": (size + (100 - len(rounds_s)) * per_round) / 1e6}


def profile(devices: int, tau: str, rounds: int) -> None:
    """One rank of ``devices`` devices under cProfile: the functions that take a round's time."""
    import cProfile
    import pstats

    from mpi4py import MPI

    from qmlhfl_mpi import Session, load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), settings(devices, tau, rounds, Path(tmp) / "p.h5"))
        t0 = time.perf_counter()
        session = Session(cfg, MPI.COMM_SELF)
        print(f"set-up {time.perf_counter() - t0:.1f} s")
        prof = cProfile.Profile()
        prof.enable()
        session.run(overwrite=True)
        prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(35)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    ap.add_argument("--tau", nargs="+", default=["1,1,1", "5,2,2"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cache-mb", type=float, help="data.cache_mb for every row (default: the config's, 512)")
    ap.add_argument("--smoke", action="store_true", help="10,000 devices, tau 1,1,1, two rounds")
    ap.add_argument("--profile", type=int, metavar="DEVICES", help="profile one rank of this many devices")
    args = ap.parse_args()
    if args.profile:
        profile(args.profile, args.tau[-1], args.rounds)
        return
    sizes, taus, rounds = ([10000], ["1,1,1"], 2) if args.smoke else (args.devices, args.tau, args.rounds)
    print(f"{'devices':>8} {'tau':>6} {'fraction':>8} {'startup_s':>9} {'round_s':>8} {'x 10^3':>7} "
          f"{'peak RSS per rank, MB':>22} {'estimate, MB':>12} {'file MB/100 rounds':>18}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for tau in taus:
            base = None
            for D in sizes:
                r = run(D, tau, args.ranks, rounds, Path(tmp), args.cache_mb)
                base = r["round_s"] if base is None else base
                fraction = min(1.0, DRAWN_PER_EDGE / max(1, D // 100))
                print(f"{r['devices']:>8} {tau:>6} {fraction:>8g} {r['startup_s']:>9.1f} {r['round_s']:>8.3f} "
                      f"{r['round_s'] / base:>7.2f} {str(r['rss_end']):>22} {r['estimate_mb']:>12.0f} "
                      f"{r['file_mb_100']:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
