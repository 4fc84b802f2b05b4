"""Soak: the quickstart interrupted by SIGTERM every few rounds, resumed on 1, 2, 3, 4, 1, ... ranks, bit for bit.

    .venv/bin/python benchmarks/soak.py [--rounds 500] [--every 50] [--ranks 1 2 3 4] [--reference-ranks 4]
                                        [--pace 0] [--smoke]

Runs ``configs/quickstart.yaml`` (``output.checkpoint_every: 1``) for
``--rounds`` global rounds as a chain of segments: each segment is
``mpiexec -n P qmlhfl-mpi run CONFIG [--resume]`` with P cycling through
``--ranks``; while it runs, the checkpoint's ``rounds_done`` attribute is
polled (read-only, HDF5 file locking off), and once it reaches the segment's
target minus one (targets ``--every``, 2 x ``--every``, ...) SIGTERM goes to
``mpiexec`` (MPICH's hydra forwards it to every rank).  The ranks stop at the
next global-round boundary after writing a checkpoint; the segment must exit
75 with the results file ``preempted``, and the round it really stopped at is
recorded (usually the target; later if the signal arrived after that round's
boundary).  The last segment runs to the end.  Then one uninterrupted run on
``mpiexec -n --reference-ranks`` must give the same ``/model/final`` and every
``/metrics`` dataset but the measured ``time_*`` ones, byte for byte.

Prints the rounds, the restarts, the rounds each segment stopped at, the rank
counts, the wall time of the interrupted chain and of the uninterrupted run,
and ``identical: True/False`` per compared dataset and overall; exits 1 if
anything differs or a segment did not end as expected.  ``--pace S`` sleeps S
seconds at the end of every round (a config callback; callbacks may change on
resume and do not change results), so that rounds are long enough for the
signal to land before the next boundary.  ``--smoke``: 4 rounds, every 2, a
2 x 2 tree with tau = (1, 1) and pace 0.2 s: two segments (on 2 ranks, then 1)
and the reference on 1, each mostly start-up (the test suite's smoke test).  No
timing is asserted.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"
SMOKE = ["topology.branching=[2, 2]", "tau=[1, 1]", "quantizer.levels=[4, 16]"]
PREEMPTED = 75


try:  # also a config callback (--pace): the ranks load this file by path
    from qmlhfl_mpi import Callback
except ImportError:  # pragma: no cover - the benchmark itself needs the package anyway
    Callback = object  # type: ignore[assignment,misc]


class Pace(Callback):  # type: ignore[misc,valid-type]
    """Sleep ``seconds`` at the end of every round on every rank (changes no result)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = float(seconds)

    def on_round_end(self, session: Any, record: Any) -> None:
        time.sleep(self.seconds)


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "MPI_", "HYDRA_", "OMPI_", "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("HDF5_USE_FILE_LOCKING", None)
    return env


def command(ranks: int, out: Path, sets: list[str], resume: bool) -> list[str]:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi", "run", str(CONFIG), "--quiet",
           "--log-level", "WARNING", "--set", f"output.path={out}", "--set", "output.checkpoint_every=1"]
    if resume:
        cmd.append("--resume")
    for s in sets:
        cmd += ["--set", s]
    return cmd


def rounds_done(ckpt: Path) -> int:
    """The checkpoint's ``rounds_done``, 0 while there is none (or it is being replaced)."""
    try:
        with h5py.File(ckpt, "r", locking=False) as f:
            return int(f.attrs["rounds_done"])
    except (OSError, KeyError):
        return 0


def read_results(path: Path, attempts: int = 50) -> h5py.File:
    for i in range(attempts):
        try:
            return h5py.File(path, "r")
        except BlockingIOError:
            if i == attempts - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def segment(ranks: int, out: Path, sets: list[str], resume: bool, target: int | None,
            log: Path) -> tuple[int, int, bool]:
    """One segment; SIGTERM to mpiexec once the checkpoint holds ``target - 1`` rounds
    (``target=None``: run to the end).  Returns (exit code, rounds done, signalled)."""
    ckpt = Path(f"{out}.ckpt")
    with open(log, "w") as err:
        proc = subprocess.Popen(command(ranks, out, sets, resume), env=child_env(), stdout=err,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        signalled = False
        while proc.poll() is None:
            if target is not None and not signalled and rounds_done(ckpt) >= target - 1:
                proc.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.01)
    rows, status = 0, "no results file"
    if out.exists():
        with read_results(out) as f:
            rows = int(f["metrics/round"].shape[0])
            status = str(f.attrs.get("status", ""))
    if proc.returncode == PREEMPTED and status != "preempted":
        raise SystemExit(f"segment on {ranks} ranks exited 75 but the results file says {status!r}; "
                         f"see {log}:\n{log.read_text()}")
    return proc.returncode, rows, signalled


def compared(path: Path) -> dict[str, np.ndarray]:
    with read_results(path) as f:
        data = {"model/final": f["model/final"][()]}
        for k in sorted(f["metrics"]):
            if not k.startswith("time_"):
                data[f"metrics/{k}"] = f["metrics"][k][()]
        data["_resumed_at"] = np.asarray(f.attrs.get("resumed_at_rounds", []))
        data["_status"] = np.asarray(str(f.attrs.get("status", "")))
    return data


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit: dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--every", type=int, default=50, help="SIGTERM every this many rounds")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4], help="rank counts the segments cycle over")
    ap.add_argument("--reference-ranks", type=int, default=4)
    ap.add_argument("--pace", type=float, default=None, help="seconds to sleep after every round (default 0)")
    ap.add_argument("--smoke", action="store_true",
                    help="4 rounds, every 2, a 2x2 tree: three short runs (2 ranks, resumed on 1; the reference on 1)")
    ap.add_argument("--keep", default=None, help="keep the files in this directory (default: a temporary one)")
    args = ap.parse_args()
    rounds, every, extra = (4, 2, list(SMOKE)) if args.smoke else (args.rounds, args.every, [])
    if args.smoke:
        args.ranks, args.reference_ranks = [2, 1], 1
    pace = args.pace if args.pace is not None else (0.2 if args.smoke else 0.0)
    if every < 2 or rounds < 1:
        ap.error("--every must be at least 2 and --rounds at least 1")
    sets = [f"train.rounds={rounds}", *extra]
    chain_sets = sets + ([f"callbacks=[{{ref: '{Path(__file__).resolve()}:Pace', args: {{seconds: {pace}}}}}]"]
                         if pace > 0 else [])
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(args.keep) if args.keep else Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        chain, ref = tmp / "chain.h5", tmp / "reference.h5"
        for p in (chain, ref, Path(f"{chain}.ckpt"), Path(f"{ref}.ckpt")):
            p.unlink(missing_ok=True)
        print(f"soak: {CONFIG.relative_to(REPO)}, {rounds} rounds, SIGTERM every {every}, ranks cycling "
              f"{args.ranks}, reference on {args.reference_ranks}; extra settings {extra or 'none'}; "
              f"pace {pace:g} s/round", flush=True)
        stops: list[int] = []
        used: list[int] = []
        done, k, ok = 0, 0, True
        t0 = time.monotonic()
        while done < rounds:
            P = args.ranks[k % len(args.ranks)]
            target = (done // every + 1) * every
            target = target if target < rounds else None
            t1 = time.monotonic()
            rc, rows, signalled = segment(P, chain, chain_sets, resume=k > 0, target=target,
                                          log=tmp / f"segment-{k}.log")
            used.append(P)
            want = 0 if target is None else PREEMPTED
            print(f"  segment {k}: {P} rank(s), rounds {done}..{rows - 1}, exit {rc}"
                  f"{' (SIGTERM sent)' if signalled else ''}, target {target or rounds}, "
                  f"{time.monotonic() - t1:.1f} s", flush=True)
            if rc != want or rows <= done:
                print(f"  segment {k} ended unexpectedly (wanted exit {want}); its log:\n"
                      f"{(tmp / f'segment-{k}.log').read_text()}", flush=True)
                ok = False
                break
            if rc == PREEMPTED:
                stops.append(rows)
            done, k = rows, k + 1
        chain_s = time.monotonic() - t0
        t0 = time.monotonic()
        rc_ref, rows_ref, _ = segment(args.reference_ranks, ref, sets, resume=False, target=None,
                                      log=tmp / "reference.log")
        ref_s = time.monotonic() - t0
        if rc_ref != 0:
            print(f"reference run exited {rc_ref}:\n{(tmp / 'reference.log').read_text()}", flush=True)
            ok = False
        print(f"rounds: {rounds}", flush=True)
        print(f"restarts: {len(stops)}", flush=True)
        print(f"stopped at rounds (rounds done): {stops}", flush=True)
        print(f"rank counts used: {used}", flush=True)
        print(f"wall time interrupted chain: {chain_s:.1f} s ({len(used)} segments)", flush=True)
        print(f"wall time uninterrupted run on {args.reference_ranks} ranks: {ref_s:.1f} s", flush=True)
        if ok:
            a, b = compared(chain), compared(ref)
            print(f"chain results: status {a.pop('_status')}, resumed_at_rounds {a.pop('_resumed_at').tolist()}; "
                  f"reference: status {b.pop('_status')}", flush=True)
            b.pop("_resumed_at")
            for name in sorted(set(a) | set(b)):
                eq = name in a and name in b and same(a[name], b[name])
                ok = ok and eq
                shape = a[name].shape if name in a else b[name].shape
                print(f"  {name:<24} {str(shape):<10} identical: {eq}", flush=True)
        print(f"identical: {ok}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
