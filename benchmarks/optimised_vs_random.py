"""Optimised versus random feasible tau under one deadline, measured with the engine.

    .venv/bin/python benchmarks/optimised_vs_random.py [--out results/opt_vs_random]
        [--deadline 30] [--lr-factor 0.5] [--max-tau 20] [--random 5] [--seed 1] [--ranks 2]

About 30 s per invocation on 2 cores (6-7 short engine runs).

1. Writes the synthetic-data config below (Synthetic(0.5, 0.5), logistic
   regression, 12 devices in a 2 x 2 x 3 tree, N = 3, QSGD s = (8, 8, 4),
   bucket 64, a slow cloud link) to ``OUT/base.yaml``.
2. Computes the smoothness constant exactly enough to be a true bound: for
   softmax cross entropy the Hessian is at most ``1/2 X~^T X~ / n`` (X~ with a
   ones column for the bias), so ``L = max_k 1/2 lambda_max(X~_k^T X~_k / n_k)``
   holds for every model, every device.  Estimates the bound's other constants
   at the initial model ``w0``: ``sigma2`` (largest per-device minibatch
   gradient variance), ``zeta2`` (heterogeneity ``sum_k p_k ||grad f_k -
   grad f||^2``) and ``gap0 <= f(w0)`` (cross entropy is >= 0).
3. ``lr = lr_factor * max_lr(L, tau = 1 ... 1)``; runs ``qmlhfl-mpi optimize
   --deadline D --L L --lr lr --sigma2 S --zeta2 Z --gap0 G --write ...`` twice:
   with the constants estimated at ``w0`` and with ``optimize``'s defaults
   (``sigma2 = 1, zeta2 = 0, gap0 = 1``); draws ``--random`` feasible tau with
   ``optimize.random_feasible(seed=--seed)`` (feasibility does not depend on
   those constants, so both optima face the same random draws).
4. Runs the engine (``mpiexec -n RANKS qmlhfl-mpi run``) once for every
   distinct tau with ``train.rounds = T = floor(D / modelled round time)``, so
   every run spends the deadline's modelled time, and prints one table: both
   bounds, rounds, SGD steps, test accuracy at 25/50/75/100 % of the deadline
   (cumulative ``/metrics/modelled_time``), final test loss; then, per set of
   constants, the optimum's final accuracy against the random draws and the
   Spearman rank correlation between the bound and the final test error.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from qmlhfl_mpi import config
from qmlhfl_mpi.config import build
from qmlhfl_mpi.core.optimize import random_feasible
from qmlhfl_mpi.core.theory import LatencyModel, convergence_bound, max_lr, q_per_link, round_time
from qmlhfl_mpi.learning.models import num_parameters

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "topology": {"branching": [2, 2, 3]},
    "tau": [1, 1, 1],
    "quantizer": {"levels": [8, 8, 4], "bucket": 64},
    "train": {"lr": 0.001, "batch_size": 16, "rounds": 1, "seed": 3, "eval_every": 1},
    "data": {"name": "synthetic",
             "synthetic": {"dim": 60, "classes": 10, "samples": 200, "alpha": 0.5, "beta": 0.5}},
    "model": {"name": "logreg"},
    # 10 ms per SGD step; device and edge links 100 kbit/s, the cloud link 20 kbit/s with 200 ms latency
    "latency": {"step_time": 0.01, "uplink_rate": [1.0e5, 1.0e5, 2.0e4], "uplink_latency": [0.005, 0.02, 0.2]},
    "output": {"path": "base.h5"},
}


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_", "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def constants(cfg: config.Config) -> dict[str, float]:
    """``L`` (a global bound) and ``sigma2``, ``zeta2``, ``gap0`` at the initial model."""
    tree = cfg.build_tree()
    data = build.local_data(cfg, tree, range(tree.num_devices), 0, 1)
    model = build.model(cfg, data.input_shape, data.num_classes)
    W, b = (p.detach().numpy().astype(np.float64) for p in model.parameters())  # (C, d), (C,)
    Ls, grads, losses, sig = [], [], [], []
    B = cfg.train.batch_size
    for x, y in data.train.values():
        x, y = x.numpy().astype(np.float64), y.numpy()
        n = len(y)
        Xt = np.hstack([x, np.ones((n, 1))])
        Ls.append(0.5 * float(np.linalg.eigvalsh(Xt.T @ Xt / n)[-1]))
        z = x @ W.T + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        losses.append(float(-np.log(p[np.arange(n), y]).mean()))
        r = p.copy()
        r[np.arange(n), y] -= 1.0
        G = (r[:, :, None] * Xt[:, None, :]).reshape(n, -1)  # per-sample gradients
        g = G.mean(axis=0)
        grads.append(g)
        per_sample = float(((G - g) ** 2).sum(axis=1).mean())
        b_eff = min(B, n)  # minibatches are drawn without replacement
        sig.append(per_sample / b_eff * (n - b_eff) / max(n - 1, 1))
    gbar = np.mean(grads, axis=0)
    return {"L": max(Ls), "sigma2": max(sig), "zeta2": float(np.mean([((g - gbar) ** 2).sum() for g in grads])),
            "gap0": float(np.mean(losses)), "dim": num_parameters(model)}


def run_engine(cfg_path: Path, tau: tuple[int, ...], rounds: int, out: Path, ranks: int, lr: float) -> float:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi", "run", str(cfg_path), "--quiet",
           "--overwrite", "--set", f"tau={list(tau)}", "--set", f"train.rounds={rounds}",
           "--set", f"train.lr={lr!r}", "--set", f"output.path={out}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"run failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


def accuracy_at(path: Path, deadline: float, fractions: tuple[float, ...]) -> tuple[list[float], float, str]:
    with h5py.File(path) as f:
        acc = f["metrics/test_accuracy"][()]
        loss = f["metrics/test_loss"][()]
        t = np.cumsum(f["metrics/modelled_time"][()])
        status = str(f.attrs["status"])
    out = []
    for fr in fractions:
        ok = np.flatnonzero((t <= fr * deadline * (1 + 1e-12)) & np.isfinite(acc))
        out.append(float(acc[ok[-1]]) if ok.size else math.nan)
    return out, float(loss[-1]), status


def ranks(x: list[float]) -> np.ndarray:
    """Ranks 1..n, ties averaged."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


CONSTANTS = ("estimated", "defaults")  # defaults: qmlhfl-mpi optimize's sigma2=1, zeta2=0, gap0=1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "results" / "opt_vs_random"))
    ap.add_argument("--deadline", type=float, default=30.0, help="modelled seconds")
    ap.add_argument("--lr-factor", type=float, default=0.5, help="lr = factor * max_lr(L, tau all 1)")
    ap.add_argument("--max-tau", type=int, default=20)
    ap.add_argument("--random", type=int, default=5, help="random feasible tau vectors")
    ap.add_argument("--seed", type=int, default=1, help="seed of random_feasible")
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(BASE, output={"path": str(out / "base.h5")})
    base_path = out / "base.yaml"
    base_path.write_text(yaml.safe_dump(base, sort_keys=False))
    cfg = config.load(base_path)
    tree = cfg.build_tree()
    torch.set_num_threads(1)

    est = constants(cfg)
    L, dim, D = est["L"], est["dim"], args.deadline
    consts = {"estimated": est, "defaults": {"sigma2": 1.0, "zeta2": 0.0, "gap0": 1.0}}
    levels, bucket = cfg.quantizer.levels, cfg.quantizer.bucket
    codecs = build.codecs(cfg)  # one codec per link, as the optimize command builds them
    qs = q_per_link(dim, codecs)
    lat = LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())
    lr = args.lr_factor * max_lr(L, [1] * tree.N, qs, tree)
    print(f"config {base_path}: tree {list(cfg.topology.branching)} ({tree.num_devices} devices), {dim} parameters, "
          f"levels {list(levels)}, bucket {bucket}, q = {[round(q, 4) for q in qs]}")
    print(f"L = {L:.4g} (max over devices of 1/2 lambda_max(X~^T X~/n): a bound for every model)")
    for name in CONSTANTS:
        c = consts[name]
        print(f"bound constants '{name}': sigma2 = {c['sigma2']:.4g}, zeta2 = {c['zeta2']:.4g}, gap0 = {c['gap0']:.4g}")
    print(f"lr = {args.lr_factor:g} x max_lr(tau = 1) = {lr:.4g}; deadline {D:g} s (modelled); max_tau {args.max_tau}")

    opt: dict[str, tuple[int, ...]] = {}
    for name in CONSTANTS:
        c = consts[name]
        path = out / f"optimised_{name}.yaml"
        cmd = [sys.executable, "-m", "qmlhfl_mpi", "optimize", str(base_path), "--deadline", repr(D), "--L", repr(L),
               "--lr", repr(lr), "--max-tau", str(args.max_tau), "--sigma2", repr(c["sigma2"]),
               "--zeta2", repr(c["zeta2"]), "--gap0", repr(c["gap0"]), "--write", str(path), "--overwrite"]
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=True)
        print(f"$ qmlhfl-mpi optimize ({name} constants)\n" + proc.stdout.rstrip())
        opt[name] = tuple(config.load(path).tau)
    rand = [tuple(t) for t in random_feasible(dim, codecs, tree, lat, D, L, lr, args.max_tau,
                                              count=args.random, seed=args.seed)]

    fr = (0.25, 0.5, 0.75, 1.0)
    rows = [(f"optimised ({name})", opt[name]) for name in CONSTANTS]
    rows += [(f"random {i + 1}", t) for i, t in enumerate(rand)]
    done: dict[tuple[int, ...], tuple] = {}
    total = 0.0
    for _, tau in rows:
        if tau in done:
            continue
        rt = round_time(dim, tau, codecs, tree, lat)
        T = math.floor(D / rt)
        bounds = [convergence_bound(T, lr, L, tau, qs, tree, consts[n]["sigma2"], consts[n]["gap0"],
                                    consts[n]["zeta2"]) for n in CONSTANTS]
        h5 = out / ("run_" + "-".join(map(str, tau)) + ".h5")
        total += run_engine(base_path, tau, T, h5, args.ranks, lr)
        accs, loss, status = accuracy_at(h5, D, fr)
        done[tau] = (bounds, rt, T, T * math.prod(tau), accs, loss, status)

    print(f"\n{len(done)} engine runs (mpiexec -n {args.ranks}), {total:.0f} s wall in all\n")
    print("| run | tau | bound (estimated) | bound (defaults) | round s | T | SGD steps | acc @25% | acc @50% "
          "| acc @75% | acc @100% | test loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, tau in rows:
        bounds, rt, T, steps, accs, loss, status = done[tau]
        st = "" if status == "completed" else f" ({status})"
        print(f"| {label} | {list(tau)} | {bounds[0]:.4g} | {bounds[1]:.4g} | {rt:.4g} | {T} | {steps} | "
              + " | ".join(f"{a:.4f}" for a in accs) + f" | {loss:.4f}{st} |")
    print()
    r = [done[t][4][-1] for t in rand]
    distinct = list(done)
    for i, name in enumerate(CONSTANTS):
        o = done[opt[name]][4][-1]
        rho = spearman([done[t][0][i] for t in distinct], [-done[t][4][-1] for t in distinct])
        print(f"'{name}' constants: optimised {list(opt[name])} final accuracy {o:.4f}; random mean {np.mean(r):.4f} "
              f"(best {max(r):.4f}, worst {min(r):.4f}); optimised - random mean = {100 * (o - np.mean(r)):+.2f} "
              f"points; at least as accurate as {sum(o >= a for a in r)} of {len(r)} random draws; Spearman "
              f"rank correlation of the bound with the final error over the {len(distinct)} distinct tau: {rho:+.2f}")


if __name__ == "__main__":
    main()
