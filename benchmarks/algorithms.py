"""Final accuracy and total bytes of the algorithm options, on real mpiexec runs.

    .venv/bin/python benchmarks/algorithms.py [--ranks 2] [--rounds 30] [--fmnist-rounds 20] [--smoke]

Two settings, one seed each (the studies repeat what matters with several):

* ``quickstart``: ``configs/quickstart.yaml`` as it is (N = 3, 32 synthetic
  devices, s = (4, 16, 64));
* ``fmnist``: Debian's Fashion-MNIST, the MLP-200, 32 devices with 2-class
  shards under 4 edge servers (N = 2, tau = (5, 2), s = (16, 16)); skipped
  when the data set is not installed.

For each setting it runs: every link float32 (the baseline); full participation
(the setting's qsgd links); ``participation.fraction`` 0.25
on link 1; server momentum (FedAvgM, beta 0.9) at the cloud; FedAdam at the
cloud; top-k 1% on link 1 without and with error feedback; scaled sign on
link 1 with error feedback; downlink qsgd with s = 16 on every link; buffered layers 2..N (full buffers below
the cloud, 2 at the cloud); local DP (sigma 0.5) under secure aggregation at the edges (intsum codes), the same
noise as distributed DP (discrete shares in 32-bit codes), and edge DP with an adaptive clip.  It
prints the final and the best test accuracy and the total uplink and downlink
megabytes from each run's results file, and each run's wall time (seconds, mpiexec included).
``--smoke`` runs two tiny variants in seconds, at once and with ``train.vectorize=off`` (the first batched step imports
``torch._dynamo``, about a second a process): the test suite's smoke test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from jobs import mpiexec, results

REPO = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"


def variants(N: int) -> dict[str, list[str]]:
    """The option sets, for a tree of N layers (link 1 = devices, the cloud = layer N)."""
    def per_link(first: str, rest: str) -> str:
        return "[" + ", ".join([first] + [rest] * (N - 1)) + "]"

    def at_cloud(kind: str) -> str:
        return "[" + ", ".join(["avg"] * (N - 1) + [kind]) + "]"

    cloud, adam = at_cloud("momentum"), at_cloud("adam")
    return {
        "float32": [f"quantizer.levels={per_link('none', 'none')}"],
        "full participation": [],
        "f_1 = 0.25": [f"participation.fraction={per_link('0.25', '1.0')}"],
        "server momentum": [f"server.optimizer={cloud}", f"server.momentum={per_link('0.9', '0.9')}"],
        "FedAdam": [f"server.optimizer={adam}", f"server.lr={per_link('0.03', '0.03')}"],
        "topk 1%": [f"quantizer.kind={per_link('topk', 'qsgd')}"],
        "topk 1% + EF": [f"quantizer.kind={per_link('topk', 'qsgd')}",
                         f"quantizer.error_feedback={per_link('true', 'false')}"],
        "sign + EF": [f"quantizer.kind={per_link('sign', 'qsgd')}",
                      f"quantizer.error_feedback={per_link('true', 'false')}"],
        "downlink s = 16": [f"quantizer.downlink={per_link('16', '16')}"],
        # buffered layers 2..N (docs/algorithms.md): full buffers at the regions, half at the cloud
        "buffered 2..N": [f"aggregation.policy=[all{', buffered' * (N - 1)}]",
                          "aggregation.buffer=[0" + ", 2" * (N - 1) + "]",
                          "aggregation.staleness=[constant" + ", polynomial(0.5)" * (N - 1) + "]"],
        # local DP (sigma 0.5, C = 1) under secure aggregation at the edges (docs/privacy.md)
        "local DP + secagg": [f"quantizer.kind={per_link('intsum', 'qsgd')}", "quantizer.levels=[16"
                              + ", 16" * (N - 1) + "]", "privacy.clip=1.0", "privacy.noise_multiplier=0.5",
                              "privacy.placement=local", f"privacy.secure_aggregation={per_link('true', 'false')}"],
        # the same noise split into discrete shares of the 8 devices of an edge (distributed DP; 32-bit codes)
        "distributed DP + secagg": [f"quantizer.kind={per_link('intsum', 'qsgd')}", "quantizer.levels=[32"
                                    + ", 16" * (N - 1) + "]", "privacy.clip=1.0", "privacy.noise_multiplier=0.5",
                                    "privacy.placement=distributed", "privacy.secure_threshold=8",
                                    f"privacy.secure_aggregation={per_link('true', 'false')}"],
        # each edge noises its devices' sum (sigma 0.5); the clip follows the median update norm from C = 1
        "edge DP + adaptive clip": ["privacy.clip=1.0", "privacy.noise_multiplier=0.5", "privacy.placement=edge",
                                    "privacy.layer=1", "privacy.clip_quantile=0.5"],
    }


def run(ranks: int, out: Path, sets: list[str]) -> tuple[float, float, float, float, float]:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi", "run",
           str(REPO / "configs" / "quickstart.yaml"), "--quiet", "--overwrite", "--log-level", "WARNING",
           "--set", f"output.path={out}"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with h5py.File(out) as f:
        acc = f["metrics/test_accuracy"][()]
        up = float(f["metrics/uplink_bytes"][()].sum())
        down = float(f["metrics/downlink_bytes"][()].sum())
    return float(acc[-1]), float(np.nanmax(acc)), up / 1e6, down / 1e6, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30, help="quickstart rounds")
    ap.add_argument("--fmnist-rounds", type=int, default=20, help="0: skip the fmnist setting")
    ap.add_argument("--variants", nargs="+", help="run only these variants (labels as printed)")
    ap.add_argument("--smoke", action="store_true", help="two tiny variants, seconds")
    args = ap.parse_args()
    settings: dict[str, tuple[int, list[str]]] = {"quickstart": (3, [f"train.rounds={args.rounds}"])}
    if Path(FMNIST).is_dir() and not args.smoke and args.fmnist_rounds > 0:
        settings["fmnist"] = (2, ["data.name=fashion-mnist", f"data.root={FMNIST}", "data.partition.kind=shards",
                                  "data.partition.classes_per_device=2", "model.args={hidden: 200}",
                                  "topology.branching=[4, 8]", "tau=[5, 2]", "quantizer.levels=[16, 16]",
                                  f"train.rounds={args.fmnist_rounds}", "train.lr=0.05"])
    if args.smoke:
        settings = {"quickstart": (3, ["train.rounds=2", "topology.branching=[2, 2, 2]", "tau=[1, 1, 1]",
                                       "train.vectorize=off"])}
    print(f"{'setting':<11} {'variant':<19} {'final_acc':>9} {'best_acc':>8} {'uplink_MB':>10} {'downlink_MB':>11} "
          f"{'wall_s':>7}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (N, base) in settings.items():
            chosen = variants(N)
            if args.smoke:
                chosen = {k: chosen[k] for k in ("full participation", "topk 1% + EF")}
            elif args.variants:
                unknown = sorted(set(args.variants) - set(chosen))
                if unknown:
                    ap.error(f"unknown variants {unknown}; choose from {sorted(chosen)}")
                chosen = {k: v for k, v in chosen.items() if k in args.variants}
            calls = [(args.ranks, Path(tmp) / f"{name}-{i}.h5", [*base, *sets]) for i, sets in enumerate(chosen.values())]
            for label, (final, best, up, down, wall) in zip(chosen, results(run, calls, args.smoke)):
                print(f"{name:<11} {label:<19} {final:>9.4f} {best:>8.4f} {up:>10.3f} {down:>11.3f} {wall:>7.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
