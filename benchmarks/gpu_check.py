"""The GPU check: the quickstart and the CNN case on the GPU, bit-identical across rank counts, and round times.

    python benchmarks/gpu_check.py [--device cuda] [--ranks 1 2] [--rounds 4] [--smoke]

For each case it runs real ``mpiexec`` jobs with ``train.device=DEVICE`` and
``train.aggregate_on=device`` (the codecs on the GPU; only packed messages
reach the host) on every rank count of ``--ranks`` (``train.share_gpus`` lets
several ranks share one GPU), plus one job with ``train.aggregate_on=host``
on the first rank count (every vector through the host, for comparison).  It
prints per job the median round time (round 0 excluded) and its split, and
whether the final model is bit-identical to the first job's; it exits with 1
if a rank count changes the model (the host job is reported, not judged: it
is expected to agree, as the two backends do the same float32 operations).

Cases: ``quickstart`` (configs/quickstart.yaml, embedded synthetic data) and
``cnn`` (the FedAvg CNN, 1.66 M parameters, 16 devices, flat tree,
tau_1 = 5, QSGD s = 16, bucket 512) on Fashion-MNIST-format files of random
pixels that this script writes (timing does not depend on the pixels; no data
set needs to be present).  ``--smoke`` runs the quickstart for two rounds
only, its jobs all at once and with ``train.vectorize=off`` (the first batched
step imports ``torch._dynamo``, about a second a process): its times mean
nothing, the models are still compared (the test suite runs it with
``--device cpu``).
"""
from __future__ import annotations

import argparse
import gzip
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
from jobs import mpiexec, results

REPO = Path(__file__).resolve().parents[1]



def fake_fashion_mnist(root: Path, train: int, test: int, seed: int = 0) -> None:
    """Gzipped IDX files of random 28x28 images and labels, in the layout ``data.root`` accepts."""
    g = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        images = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = g.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">iiii", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">ii", 0x801, n) + labels.tobytes())



def run(ranks: int, cfg: Path, out: Path, sets: list[str]) -> tuple[np.ndarray, dict[str, float], str]:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi", "run", str(cfg), "--quiet",
           "--overwrite", "--log-level", "WARNING", "--set", f"output.path={out}"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nfailed with exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    with h5py.File(out) as f:
        model = f["model/final"][()]
        m = {k: f["metrics"][k][()] for k in ("time_compute", "time_codec", "time_comm", "time_round")}
        where = str(f.attrs["aggregation"])
    skip = 1 if len(m["time_round"]) > 2 else 0
    return model, {k: float(statistics.median(v[skip:])) for k, v in m.items()}, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="the quickstart for two rounds only")
    args = ap.parse_args()
    rounds = 2 if args.smoke else args.rounds
    device = [f"train.device={args.device}", "train.share_gpus=true"] + (["train.vectorize=off"] if args.smoke else [])
    ok = host_same = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = {"quickstart": (REPO / "configs" / "quickstart.yaml", [f"train.rounds={rounds}"])}
        if not args.smoke:
            fake_fashion_mnist(root, train=16 * 300, test=1000)
            cases["cnn"] = (REPO / "configs" / "quickstart.yaml", [
                "data.name=fashion-mnist", f"data.root={root}", "model.name=cnn", "model.args={}",
                "topology.branching=[16]", "tau=[5]", "quantizer.levels=[16]", "quantizer.bucket=512",
                f"train.rounds={rounds}", "train.eval_every=1000", "train.batch_size=32"])
        print(f"{'case':<11} {'ranks':>5} {'aggregation':<13} {'round_s':>8} {'compute_s':>9} {'codec_s':>8} "
              f"{'comm_s':>7}  identical", flush=True)
        for name, (cfg, sets) in cases.items():
            first = None
            jobs = [(p, "device") for p in args.ranks] + [(args.ranks[0], "host")]
            calls = [(p, cfg, root / f"{name}-{p}-{backend}.h5", [*sets, *device, f"train.aggregate_on={backend}"])
                     for p, backend in jobs]
            for (p, backend), (model, t, where) in zip(jobs, results(run, calls, args.smoke)):
                if first is None:
                    first = model
                same = bool(np.array_equal(model, first))
                if backend == "device":
                    ok = ok and same
                else:
                    host_same = host_same and same
                print(f"{name:<11} {p:>5} {where:<13} {t['time_round']:>8.3f} {t['time_compute']:>9.3f} "
                      f"{t['time_codec']:>8.3f} {t['time_comm']:>7.3f}  {'yes' if same else 'NO'}", flush=True)
    print("device aggregation: bit-identical across rank counts" if ok else "MODELS DIFFER across rank counts")
    print("host aggregation: the same model as device aggregation" if host_same else
          "host aggregation: a different model from device aggregation (the same float32 operations were expected)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
