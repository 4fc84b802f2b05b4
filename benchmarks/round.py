"""Quantized against float32 rounds of real mpiexec runs, and the per-round time split.

    .venv/bin/python benchmarks/round.py [--ranks 2] [--rounds 4] [--levels 16] [--aggregate-on host] [--smoke]

For the FedAvg CNN (1.66 M parameters) and the MLP-200 (199 k) on Debian's
Fashion-MNIST (16 devices, 2-class shards), on a flat tree (N = 1, tau_1 = 5)
and on two layers (4 edge servers of 4 devices, tau = (5, 2)), runs every link
with float32 (``none``) and with QSGD at ``--levels`` (bucket 512) and prints
the median round time over rounds (round 0 excluded; the MLP runs 5x
``--rounds``, its rounds are short and noisy), its split into compute
/ codec / communication (max over ranks; communication includes waiting for
slower ranks) and the quantized/float32 ratio of the round time.  Without
Fashion-MNIST it uses the embedded synthetic data with the MLP only.
``--aggregate-on device`` runs the aggregation as torch tensors on the training
device (the GPU code path; here the CPU) instead of numpy on the host.
``--smoke`` runs one tiny case in seconds, its two runs at once and with
``train.vectorize=off`` (the first batched step imports ``torch._dynamo``, about
a second a process): the test suite's smoke test.
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
from jobs import mpiexec, results

REPO = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"
TOPOLOGIES = {"flat": ("topology.branching=[16]", "tau=[5]"), "two-layer": ("topology.branching=[4,4]", "tau=[5,2]")}




def run(ranks: int, out: Path, sets: list[str]) -> dict[str, float]:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi", "run",
           str(REPO / "configs" / "quickstart.yaml"), "--quiet", "--overwrite", "--log-level", "WARNING",
           "--set", f"output.path={out}"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    with h5py.File(out) as f:
        m = {k: f["metrics"][k][()] for k in ("time_compute", "time_codec", "time_comm", "time_round")}
        params = int(f.attrs["num_params"])
    skip = 1 if len(m["time_round"]) > 2 else 0
    med: dict[str, float] = {k: float(statistics.median(v[skip:])) for k, v in m.items()}
    med["params"] = params
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--levels", type=int, default=16)
    ap.add_argument("--aggregate-on", default="host", choices=("host", "device"), help="train.aggregate_on")
    ap.add_argument("--smoke", action="store_true", help="one tiny case, seconds")
    args = ap.parse_args()
    real = Path(FMNIST).is_dir() and not args.smoke
    data = ["data.name=fashion-mnist", f"data.root={FMNIST}", "data.partition.kind=shards",
            "data.partition.classes_per_device=2", "train.batch_size=32"] if real else []
    models = {"cnn": ["model.name=cnn", "model.args={}"], "mlp-200": ["model.name=mlp", "model.args={hidden: 200}"]}
    if not real:
        models = {"mlp-200": ["model.name=mlp", "model.args={hidden: 200}"]}
    topologies = dict(list(TOPOLOGIES.items())[:1]) if args.smoke else TOPOLOGIES
    rounds = 2 if args.smoke else args.rounds
    print(f"{'model':<8} {'tree':<10} {'links':<7} {'params':>9} {'round_s':>8} {'compute_s':>9} {'codec_s':>8} "
          f"{'comm_s':>7} {'q/f32':>6}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, mset in models.items():
            for tname, tset in topologies.items():
                N = 1 if tname == "flat" else 2
                r_model = rounds if label == "cnn" or args.smoke else 5 * rounds  # cheap rounds: more of them
                base = [*data, *mset, *tset, f"train.rounds={r_model}", "train.eval_every=1000", "quantizer.bucket=512",
                        f"train.aggregate_on={args.aggregate_on}", *(["train.vectorize=off"] if args.smoke else [])]
                res = {}
                cases = (("float32", ["none"] * N), (f"s={args.levels}", [str(args.levels)] * N))
                calls = [(args.ranks, Path(tmp) / f"{label}-{tname}-{links}.h5",
                          [*base, f"quantizer.levels=[{','.join(levels)}]"]) for links, levels in cases]
                for (links, _), r in zip(cases, results(run, calls, args.smoke)):
                    res[links] = r
                    ratio = r["time_round"] / res["float32"]["time_round"]
                    print(f"{label:<8} {tname:<10} {links:<7} {r['params']:>9} {r['time_round']:>8.3f} "
                          f"{r['time_compute']:>9.3f} {r['time_codec']:>8.3f} {r['time_comm']:>7.3f} {ratio:>6.3f}",
                          flush=True)


if __name__ == "__main__":
    main()
