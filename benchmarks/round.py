"""Per-round time split (compute / codec / communication) of real mpiexec runs.

    .venv/bin/python benchmarks/round.py [--ranks 1 2 4] [--rounds 10] [--big-rounds 3]

Runs configs/quickstart.yaml at each rank count, then the same tree with a
~1.6 M-parameter MLP (model.args.hidden=1250), and, where Debian's Fashion-MNIST is
installed, the 1.66 M-parameter FedAvg CNN on 8 devices; reads the HDF5 files and prints the
median over rounds (round 0 excluded when there are more than two) of each
part, as seconds and as a share of the round. time_* are the max over ranks;
time_comm includes waiting for slower ranks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def run(ranks: int, out: Path, sets: list[str]) -> dict[str, float]:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi", "run",
           str(REPO / "configs" / "quickstart.yaml"), "--quiet", "--overwrite", "--set", f"output.path={out}"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_"))}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with h5py.File(out) as f:
        m = {k: f["metrics"][k][()] for k in ("time_compute", "time_codec", "time_comm", "time_round")}
        params = int(f.attrs["num_params"])
    skip = 1 if len(m["time_round"]) > 2 else 0
    med = {k: statistics.median(v[skip:]) for k, v in m.items()}
    med["params"] = params
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--big-rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"{'model':<12} {'params':>9} {'ranks':>5} {'round_s':>8} {'compute_s':>9} {'codec_s':>8} {'comm_s':>8} "
          f"{'codec%':>7} {'comm%':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("quickstart", [f"train.rounds={args.rounds}"]),
                 ("mlp-1250", [f"train.rounds={args.big_rounds}", "model.args.hidden=1250", "train.eval_every=100"])]
        if Path(FMNIST).is_dir():  # the FedAvg CNN (1.66 M parameters) on real images, 8 devices
            cases.append(("cnn-fmnist", [f"train.rounds={args.big_rounds}", "model.name=cnn", "data.name=fashion-mnist",
                                         f"data.root={FMNIST}", "topology.branching=[2,2,2]", "train.batch_size=64",
                                         "train.eval_every=100", "data.partition.kind=shards"]))
        for label, sets in cases:
            for n in args.ranks:
                r = run(n, Path(tmp) / f"{label}-{n}.h5", sets)
                tot = r["time_round"]
                print(f"{label:<12} {r['params']:>9} {n:>5} {tot:>8.3f} {r['time_compute']:>9.3f} {r['time_codec']:>8.3f} "
                      f"{r['time_comm']:>8.3f} {100 * r['time_codec'] / tot:>6.1f}% {100 * r['time_comm'] / tot:>5.1f}%",
                      flush=True)


if __name__ == "__main__":
    main()
