"""Study 12 of docs/experiments.md (issue 24, item 4): `optimize --search halving` evaluated so that it cannot fool
itself.

* Four networks: {slow cloud link, slow device link} x {constant device speed, lognormal(1) device speed}.
  Two designs for the drawn speeds: ``one-network`` (``system.seed: 0`` in every run: the network the search saw
  is the one it is evaluated on; only the training seed varies) and ``per-seed`` (the speeds are drawn anew with
  each ``train.seed``, so the evaluation seeds run on other networks than the search's).  Constant speeds draw
  nothing, so both designs share those runs.
* For each network and each of three deadlines of virtual time, the search runs on seed 0 with 10% of the
  training data held out for validation (`analysis.search.search`, the code behind the command).
* Every candidate of the grid (tau_n in 1, 2, 4, 8, 16: 25 configurations) runs once per evaluation seed 1..4 for
  the longest deadline, evaluated on the test set after every round.  The clock is deterministic, so these runs are
  re-read at every deadline (`analysis.evaluation.accuracy_at`): the grid is the oracle's search space, and the
  baselines (the default tau, 10 random deadline-feasible draws, the most SGD steps by the deadline) are read
  from it too.
* Per cell: the chosen tau against the median random draw (win, paired 95% t interval over the seeds), the regret
  to the oracle, and the default and most-steps means beside them.

Usage (from the repository root; two processes share the jobs, each runs its pilots and grid runs in-process):

    python studies/optimizer_eval.py run --design one-network --part 0 --parts 2 &
    python studies/optimizer_eval.py run --design one-network --part 1 --parts 2
    python studies/optimizer_eval.py table --design one-network > studies/optimizer_eval.out

Results go to results/studies/optimizer/ (grid runs, one JSON per search under search/<method>-<design>/, one
cost line per job); `run` skips the jobs whose output exists, so an interrupted study continues.  ``--method v1``
reads the searches of the first version (kept as records; its code gave a candidate with no round within a rung's
budget one round anyway) with ``table``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from qmlhfl_mpi import config as config_mod
from qmlhfl_mpi.analysis.candidates import deadline_grid_values, most_steps, random_draws
from qmlhfl_mpi.analysis.clockfit import ClockModel
from qmlhfl_mpi.analysis.evaluation import accuracy_at, cell, summary
from qmlhfl_mpi.analysis.search import search
from qmlhfl_mpi.config.build import model_dim
from qmlhfl_mpi.results.reader import read_run

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "studies" / "configs" / "fmnist_optimizer.yaml"
OUT = Path("results/studies/optimizer")
NETWORKS = {
    "slow-cloud": ["latency.uplink_rate=[1.0e7,2.0e5]", "latency.uplink_latency=[0.02,0.5]"],
    "slow-device": ["latency.uplink_rate=[2.0e5,1.0e7]", "latency.uplink_latency=[0.5,0.02]"],
}
SPEEDS = {"constant": "constant", "lognormal1": "lognormal(1)"}
VALUES = (1, 2, 4, 8, 16)
DEADLINES = (8.0, 20.0, 40.0)
EVAL_SEEDS = (1, 2, 3, 4)
SEARCH_SEED = 0
DEFAULT = (4, 4)
DRAWS = 10
INITIAL = 0.1  # accuracy before any round ends: chance on the 10 balanced test classes
METHOD = "v2"  # the search's version: v2 compares every rung at equal virtual time (docs/theory.md section 18)


DESIGNS = ("one-network", "per-seed")


def systems(design: str) -> list[tuple[str, list[str]]]:
    fixed = ["system.seed=0"] if design == "one-network" else []
    return [(f"{net}/{sp}", [*sets, f"system.speed={SPEEDS[sp]}", *fixed]) for net, sets in NETWORKS.items()
            for sp in SPEEDS]


def drawn(system: str) -> bool:
    return not system.endswith("/constant")


def load(sets: list[str], seed: int, tau: tuple[int, ...] = DEFAULT) -> config_mod.Config:
    cfg = config_mod.load(str(BASE), [*sets, f"train.seed={seed}"])
    return dataclasses.replace(cfg, tau=tuple(tau))


def clock_of(cfg: config_mod.Config) -> ClockModel:
    return ClockModel(cfg, cfg.build_tree(), model_dim(cfg))


def grid_path(design: str, system: str, tau: tuple[int, ...], seed: int) -> Path:
    where = OUT / "grid" / system / (design if drawn(system) else "")
    return where / f"tau{tau[0]}-{tau[1]}-seed{seed}.h5"


def search_path(method: str, design: str, system: str, deadline: float) -> Path:
    return OUT / "search" / f"{method}-{design if drawn(system) else 'constant'}" / system / f"deadline{deadline:g}.json"


def jobs(design: str) -> list[tuple]:
    out: list[tuple] = [("search", design, name, sets, d) for name, sets in systems(design) for d in DEADLINES]
    out += [("grid", design, name, sets, tau, seed) for name, sets in systems(design) for seed in EVAL_SEEDS
            for tau in ((a, b) for a in VALUES for b in VALUES)]
    return out


def _session_run(cfg: config_mod.Config, resume: bool = False) -> str:
    from mpi4py import MPI

    from qmlhfl_mpi.run.session import Session
    summary_ = Session(cfg, MPI.COMM_SELF).run(overwrite=not resume, resume=resume)
    if summary_.status != "completed":
        raise RuntimeError(f"{cfg.output.path}: {summary_.status} {summary_.message}")
    return summary_.path


def run_job(job: tuple, log) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    if job[0] == "search":
        _, design, name, sets, deadline = job
        path = search_path(METHOD, design, name, deadline)
        if path.exists():
            return
        cfg = load(sets, SEARCH_SEED)
        tmp = OUT / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        res = search(cfg, clock_of(cfg), deadline, _session_run, values=VALUES, candidates=12, eta=3,
                     validation=0.1, workdir=tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(res.to_json())
        what = f"search {METHOD} {design} {name} {deadline:g}"
    else:
        _, design, name, sets, tau, seed = job
        path = grid_path(design, name, tau, seed)
        if path.exists():
            return
        cfg = load(sets, seed, tau)
        rounds = clock_of(cfg).rounds_within(tau, max(DEADLINES))
        path.parent.mkdir(parents=True, exist_ok=True)
        if rounds < 1:  # not one round within the longest deadline: an empty marker, read as INITIAL
            path.with_suffix(".none").write_text("no round within the deadline\n")
            return
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rounds=rounds),
                                  output=dataclasses.replace(cfg.output, path=str(path)))
        _session_run(cfg)
        what = f"grid {design} {name} {tau} seed {seed}"
    log.write(json.dumps({"job": what, "wall_s": time.perf_counter() - t0, "core_s": time.process_time() - c0})
              + "\n")
    log.flush()


def cmd_run(design: str, part: int, parts: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"cost-part{part}.jsonl", "a") as log:
        for job in jobs(design)[part::parts]:
            run_job(job, log)


def scores(design: str, system: str, tau: tuple[int, ...], deadline: float) -> list[float]:
    out = []
    for seed in EVAL_SEEDS:
        path = grid_path(design, system, tau, seed)
        if not path.exists():
            if path.with_suffix(".none").exists():
                out.append(INITIAL)
                continue
            raise SystemExit(f"missing grid run {path}: run the study first")
        m = read_run(path)["metrics"]
        out.append(accuracy_at(m["virtual_time"], m["test_accuracy"], deadline, initial=INITIAL))
    return out


def cmd_table(design: str, method: str) -> None:
    name_of = {}
    cells = []
    print("| network | speed | deadline s | chosen | oracle | chosen % | median draw % | chosen - median (95% CI) "
          "| regret pts | default % | most steps % | win |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    search_core = grid_core = 0.0
    full_runs = []
    for i, (system, sets) in enumerate(systems(design)):
        clock0 = clock_of(load(sets, SEARCH_SEED))
        for j, deadline in enumerate(DEADLINES):
            rec = json.loads(search_path(method, design, system, deadline).read_text())
            search_core += rec["cost_core_seconds"]
            full_runs.append(rec["full_run_core_seconds"])
            grid = deadline_grid_values(clock0, 2, VALUES, deadline)
            draws = random_draws(grid, DRAWS, seed=100 * i + j)
            fastest = most_steps(clock0, grid, deadline)
            chosen = tuple(rec["chosen"])
            every = {tau: scores(design, system, tau, deadline) for tau in ((a, b) for a in VALUES for b in VALUES)}
            for tau in every:
                name_of[tau] = f"({tau[0]}, {tau[1]})"
            sc = {name_of[t]: v for t, v in every.items()}
            c = cell(sc, name_of[chosen], [name_of[t] for t in draws], name_of[DEFAULT], name_of[fastest])
            cells.append(c)
            net, speed = system.split("/")
            print(f"| {net} | {speed} | {deadline:g} | {c.chosen} | {c.oracle} | {100 * c.chosen_mean:.2f} | "
                  f"{100 * c.median_draw_mean:.2f} | {c.diff:+.2f} ± {c.half_width:.2f} | {c.regret:.2f} | "
                  f"{100 * c.default_mean:.2f} | {100 * c.fastest_mean:.2f} | {'yes' if c.win else 'no'} |")
    win, regret = summary(cells)
    print()
    print(f"win rate against the median random draw: {sum(c.win for c in cells)} of {len(cells)} cells "
          f"({100 * win:.0f}%); mean regret to the oracle {regret:.2f} points; median regret "
          f"{float(np.median([c.regret for c in cells])):.2f}; largest {max(c.regret for c in cells):.2f}; "
          f"the interval excludes 0 in {sum(c.diff - c.half_width > 0 for c in cells)} cells (above) and "
          f"{sum(c.diff + c.half_width < 0 for c in cells)} (below)")
    for name, attr in (("the default (4, 4)", "default_mean"), ("most steps", "fastest_mean"),
                       ("the median draw", "median_draw_mean")):
        vals = [getattr(c, attr) for c in cells]
        beats = sum(v > c.median_draw_mean for v, c in zip(vals, cells))
        print(f"  {name}: " + (f"beats the median draw in {beats} cells; " if attr != "median_draw_mean" else "")
              + f"mean regret {float(np.mean([100 * (c.oracle_mean - v) for v, c in zip(vals, cells)])):.2f} points")
    for part in sorted(OUT.glob("cost-part*.jsonl")):
        for line in part.read_text().splitlines():
            rec = json.loads(line)
            mine = ("one-network" in rec["job"]) == (design == "one-network") or "constant" in rec["job"]
            if rec["job"].startswith("grid") and mine:
                grid_core += rec["core_s"]
    print(f"compute: searches {search_core / 60:.1f} core-min for 12 searches (median "
          f"{float(np.median([c for c in full_runs])):.1f} core-s for one full run of the choice, the searches "
          f"{search_core / max(math.fsum(full_runs), 1e-9):.2f} x that); evaluation grid {grid_core / 60:.1f} "
          f"core-min ({len(jobs(design)) - 12} runs)")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--design", choices=DESIGNS, required=True)
    r.add_argument("--part", type=int, default=0)
    r.add_argument("--parts", type=int, default=1)
    t = sub.add_parser("table")
    t.add_argument("--design", choices=DESIGNS, required=True)
    t.add_argument("--method", default=METHOD, help=f"the searches of this version (default {METHOD}; v1: the first)")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        cmd_run(a.design, a.part, a.parts)
    else:
        cmd_table(a.design, a.method)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
