"""Write ``studies/optvsrandom.txt``: optimised against random feasible tau under one deadline on Fashion-MNIST.

    .venv/bin/python studies/optvsrandom.py      # about 1-2 min: the optimiser's calibration pilots

1. ``qmlhfl-mpi optimize --calibrate`` on the study's config (N = 3, 32 devices, shards, QSGD s = (4, 8, 8),
   the slow-cloud deadline model, lr 0.05) with a deadline of ``DEADLINE`` modelled seconds and tau_n in
   1..``MAX_TAU``: the pilots fit the bound's scale ``c`` (``L_eff = c L``), and the calibrated bound
   picks tau.  Its output is saved to ``studies/optvsrandom_optimize.out``.
2. ``RANDOM`` distinct random feasible tau under the same calibrated bound and deadline
   (``qmlhfl_mpi.core.optimize.random_feasible``, seed 1), plus the default tau (4, 2, 2).
3. One sweep line per (tau, seed) with ``train.rounds = floor(deadline / modelled round time)``: every run
   spends at most the deadline's modelled time; the report compares the accuracy at the deadline
   (``--at-time``).
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate as g  # noqa: E402  (the studies' shared helpers)

DEADLINE = 25.0
MAX_TAU = 8
RANDOM = 5
SETS = ["topology.branching=[2,2,8]", "tau=[4,2,2]", "quantizer.levels=[4,8,8]", *g.latency_sets(3)]


def main() -> None:
    from qmlhfl_mpi.config import build, load_config
    from qmlhfl_mpi.core.optimize import random_feasible
    from qmlhfl_mpi.core.theory import LatencyModel

    written = g.REPO / "studies" / "configs" / "optvsrandom_optimised.yaml"
    cmd = [sys.executable, "-m", "qmlhfl_mpi", "optimize", g.BASE, *(w for s in SETS for w in ("--set", s)),
           "--deadline", repr(DEADLINE), "--max-tau", str(MAX_TAU), "--calibrate", "--write", str(written),
           "--overwrite"]
    proc = subprocess.run(cmd, cwd=g.REPO, capture_output=True, text=True, check=True)
    (g.REPO / "studies" / "optvsrandom_optimize.out").write_text("$ qmlhfl-mpi " + " ".join(cmd[3:]) + "\n"
                                                                 + proc.stdout)
    print(proc.stdout)
    L_eff = float(re.search(r"CALIBRATED bound with L_eff = \S+ L = (\S+)", proc.stdout).group(1))
    opt = tuple(load_config(str(written)).tau)
    cfg = load_config(str(g.REPO / g.BASE), SETS)
    tree = cfg.build_tree()
    lat = LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())
    codecs = build.codecs(cfg)
    draws: list[tuple[int, ...]] = []
    for t in random_feasible(g.D_MLP200, codecs, tree, lat, DEADLINE, L_eff, cfg.train.lr, MAX_TAU, count=200,
                             seed=1):
        if tuple(t) not in draws and tuple(t) != opt and tuple(t) != (4, 2, 2) and len(draws) < RANDOM:
            draws.append(tuple(t))
    variants = []
    for name, tau in [("optimised", opt), ("default", (4, 2, 2)), *((f"random{i + 1}", t) for i, t in enumerate(draws))]:
        sets = [*SETS[:1], f"tau={g.lst(tau)}", *SETS[2:]]
        rounds = math.floor(DEADLINE / g.modelled_round(sets))
        variants.append((f"{name}-tau{'-'.join(map(str, tau))}", [*sets, f"train.rounds={rounds}"]))
    g.write("optvsrandom", f"""
N = 3: 32 devices, 2 regional servers of 2 edges of 8 devices; shards of 2 classes per device; QSGD s = (4, 8, 8),
bucket 512; the slow-cloud deadline model; a deadline of {DEADLINE:g} modelled seconds, tau_n in 1..{MAX_TAU}:
the tau of 'qmlhfl-mpi optimize --calibrate' (studies/optvsrandom_optimize.out), the default (4, 2, 2) and
{RANDOM} distinct random feasible tau; train.rounds = floor(deadline / round time) in each.""",
            f"--at-time {DEADLINE:g} --last 3 --label-keys tau", variants)


if __name__ == "__main__":
    main()
