"""`qmlhfl-mpi sweep`: one config run once per seed, then `qmlhfl-mpi report` over the results.

    qmlhfl-mpi sweep CONFIG --seeds 0 1 2 [--partition-seeds 0 1] [--ranks N] [--set KEY=VALUE ...] --out-dir DIR

runs, one after the other on this machine,

    mpiexec -n N python -m qmlhfl_mpi run CONFIG [--set ...] --set train.seed=S [--set data.partition.seed=P]
        --set output.path=DIR/NAME-seedS[-pseedP].h5 --quiet

for every seed ``S`` (and, with ``--partition-seeds``, every pair ``S``, ``P``:
the cross product; fix the data split with one ``--partition-seeds P`` while
``train.seed`` varies), and then writes the report of :mod:`.report` over the
files: the table (one row per group of seeds, mean ± std), ``DIR/NAME.csv``
and the plots ``DIR/NAME_*.png``.  ``NAME`` is the config's file stem unless
``--name`` is given.  ``--dry-run`` prints the commands and runs nothing.

On SLURM, ``--emit-sweep-file FILE`` writes the same runs as the lines of a
sweep file (``CONFIG --set ... --set train.seed=S --set output.path=...``) for
``jobs/sweep.sbatch`` (one array task per line) and prints the ``sbatch`` line
that runs them; the ranks then come from ``sbatch --ntasks``.

The runs continue after a failed one; the exit status is 0 if every run and
the report succeeded, else the first failed run's exit status (``qmlhfl-mpi
run``'s codes), else the report's.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, load_config
from . import report

FIXED_KEYS = ("train.seed", "data.partition.seed", "output.path")  # set by the sweep for every run


class SweepError(ValueError):
    """A sweep cannot start; the message quotes the bad value and the fix."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its seeds, its results file and its ``qmlhfl-mpi run`` arguments."""

    seed: int
    partition_seed: int | None
    output: Path
    run_args: tuple[str, ...]   # CONFIG and the options after ``qmlhfl-mpi run``, without --quiet/--overwrite

    def command(self, mpiexec: str, ranks: int, overwrite: bool) -> list[str]:
        """The local command line: ``mpiexec -n ranks python -m qmlhfl_mpi run ...``."""
        return [mpiexec, "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi", "run", *self.run_args, "--quiet",
                *(["--overwrite"] if overwrite else [])]


def _check_seeds(option: str, seeds: Sequence[int]) -> None:
    bad = [s for s in seeds if not 0 <= s <= 2**63 - 1]
    if bad:
        raise SweepError(f"{option} {' '.join(map(str, bad))}: seeds are integers from 0 to 2^63-1, "
                         f"e.g. {option} 0 1 2")
    dup = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if dup:
        raise SweepError(f"{option}: seed(s) {dup} given more than once; each seed makes one run, "
                         "give every seed once")


def plan(config: str, seeds: Sequence[int], partition_seeds: Sequence[int] | None, sets: Sequence[str],
         out_dir: str, name: str | None = None) -> list[SweepRun]:
    """The runs of a sweep, seeds outer and partition seeds inner; validates the config with every
    run's overrides (raises :class:`SweepError` or :class:`~qmlhfl_mpi.config.ConfigError`)."""
    if not seeds:
        raise SweepError("--seeds: give at least one seed, e.g. --seeds 0 1 2")
    _check_seeds("--seeds", seeds)
    if partition_seeds is not None:
        if not partition_seeds:
            raise SweepError("--partition-seeds: give at least one seed, e.g. --partition-seeds 0, or leave the "
                             "option out to split the data with train.seed")
        _check_seeds("--partition-seeds", partition_seeds)
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in FIXED_KEYS:
            fix = {"train.seed": "--seeds", "data.partition.seed": "--partition-seeds",
                   "output.path": "--out-dir (and --name)"}[key]
            raise SweepError(f"--set {item!r}: the sweep sets {key} for every run; give it with {fix} instead")
    stem = name or Path(config).stem
    if not stem or "/" in stem or any(c.isspace() for c in stem):
        raise SweepError(f"--name {stem!r}: a file name without '/' or blanks is needed, e.g. --name lr01")
    runs = []
    for s in seeds:
        for p in partition_seeds if partition_seeds is not None else [None]:
            out = Path(out_dir) / (f"{stem}-seed{s}" + ("" if p is None else f"-pseed{p}") + ".h5")
            extra = [f"train.seed={s}"] + ([] if p is None else [f"data.partition.seed={p}"]) + [f"output.path={out}"]
            load_config(config, [*sets, *extra])  # a bad config or --set fails here, before any run starts
            args = [config]
            for item in [*sets, *extra]:
                args += ["--set", item]
            runs.append(SweepRun(s, p, out, tuple(args)))
    return runs


def find_mpiexec(given: str | None) -> str:
    """``--mpiexec``, else ``$QMLHFL_MPIEXEC``, else the ``mpiexec`` next to this Python, else the one on PATH."""
    if given:
        return given
    if os.environ.get("QMLHFL_MPIEXEC"):
        return os.environ["QMLHFL_MPIEXEC"]
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if not found:
        raise SweepError("no mpiexec found next to this Python or on PATH: install the 'mpich' extra, or give "
                         "--mpiexec PATH (or set QMLHFL_MPIEXEC)")
    return found


def sweep_file_lines(runs: Sequence[SweepRun]) -> list[str]:
    """One line per run for jobs/sweep.sbatch; it splits lines on blanks without quoting, so no word may
    hold a blank (raises :class:`SweepError`)."""
    lines = []
    for r in runs:
        spaced = [w for w in r.run_args if any(c.isspace() for c in w)]
        if spaced:
            raise SweepError(f"{spaced[0]!r} holds a blank, but jobs/sweep.sbatch splits its lines on blanks "
                             "without quoting: use paths and values without blanks (e.g. [2,16] not [2, 16])")
        lines.append(" ".join(r.run_args))
    return lines


def report_argv(runs: Sequence[SweepRun], out_dir: str, name: str, target: float | None,
                no_plots: bool) -> list[str]:
    """The ``qmlhfl-mpi report`` arguments over the sweep's files."""
    argv = [str(r.output) for r in runs] + ["--out", out_dir, "--prefix", name,
                                            "--csv", str(Path(out_dir) / f"{name}.csv")]
    if target is not None:
        argv += ["--target", repr(target)]
    return argv + (["--no-plots"] if no_plots else [])


# ---- command -----------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--seeds", nargs="+", type=int, required=True, metavar="S",
                   help="train.seed of the runs, e.g. --seeds 0 1 2 (one run each)")
    p.add_argument("--partition-seeds", nargs="+", type=int, default=None, metavar="P",
                   help="data.partition.seed of the runs (the data split and generated data): every --seeds "
                        "value with every P; default: none set, the data follow train.seed")
    p.add_argument("--ranks", "-n", type=int, default=1, metavar="N", help="MPI ranks per run (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every run, e.g. --set train.lr=0.1 (repeatable)")
    p.add_argument("--out-dir", required=True, metavar="DIR",
                   help="directory of the results files NAME-seedS.h5 and of the report")
    p.add_argument("--name", default=None, help="file name stem of the runs and the report (default: the config's)")
    p.add_argument("--mpiexec", default=None, metavar="PATH",
                   help="MPI launcher (default: $QMLHFL_MPIEXEC, the one next to this Python, or mpiexec on PATH)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing results files (and an existing --emit-sweep-file)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--emit-sweep-file", default=None, metavar="FILE",
                   help="write the runs as a sweep file for jobs/sweep.sbatch (one line per array task) instead "
                        "of running them")
    p.add_argument("--target", type=float, default=None, metavar="ACC", help="passed to the report")
    p.add_argument("--no-plots", action="store_true", help="report: the table and CSV only")


def _emit(path: Path, lines: list[str], overwrite: bool, out_dir: str, name: str) -> None:
    if path.exists() and not overwrite:
        raise SweepError(f"--emit-sweep-file {str(path)!r} exists: pass --overwrite to replace it, or choose "
                         "another file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# written by: qmlhfl-mpi sweep (one run per line, for jobs/sweep.sbatch)\n"
                        + "\n".join(lines) + "\n")
    except OSError as e:
        raise SweepError(f"cannot write --emit-sweep-file {str(path)!r}: {e}") from None
    print(f"sweep file {path}: {len(lines)} runs; submit them with\n"
          f"  sbatch --array=0-{len(lines) - 1} jobs/sweep.sbatch {shlex.quote(str(path))}\n"
          f"and report when they are done with\n"
          f"  qmlhfl-mpi report {shlex.quote(out_dir)}/{shlex.quote(name)}-seed*.h5 --out {shlex.quote(out_dir)} "
          f"--prefix {shlex.quote(name)}", flush=True)


def main(args: argparse.Namespace) -> int:
    """Run (or print, or emit) the sweep, then report; see the module docstring for the exit status."""
    try:
        if args.ranks < 1:
            raise SweepError(f"--ranks {args.ranks}: expected at least 1 MPI rank, e.g. --ranks 2")
        if args.target is not None and not 0 <= args.target <= 1:
            raise SweepError(f"--target {args.target}: expected an accuracy from 0 to 1, e.g. --target 0.8")
        runs = plan(args.config, args.seeds, args.partition_seeds, args.set, args.out_dir, args.name)
        name = args.name or Path(args.config).stem
        if args.emit_sweep_file:
            _emit(Path(args.emit_sweep_file), sweep_file_lines(runs), args.overwrite, args.out_dir, name)
            return 0
        try:
            mpiexec = find_mpiexec(args.mpiexec)
        except SweepError:
            if not args.dry_run:
                raise
            mpiexec = "mpiexec"
        existing = [str(r.output) for r in runs if r.output.exists()]
        if existing and not args.overwrite and not args.dry_run:
            raise SweepError(f"{existing[0]!r} exists ({len(existing)} of the {len(runs)} results files do): pass "
                             "--overwrite to replace them, or choose another --out-dir or --name")
    except (SweepError, ConfigError) as e:
        print(f"qmlhfl-mpi sweep: error: {e}", file=sys.stderr)
        return 2
    rargv = report_argv(runs, args.out_dir, name, args.target, args.no_plots)
    if args.dry_run:
        for r in runs:
            print(shlex.join(r.command(mpiexec, args.ranks, args.overwrite)))
        print(shlex.join(["qmlhfl-mpi", "report", *rargv]))
        return 0
    first_failure = 0
    for i, r in enumerate(runs, 1):
        cmd = r.command(mpiexec, args.ranks, args.overwrite)
        print(f"sweep: run {i}/{len(runs)}: {shlex.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False).returncode
        except OSError as e:
            print(f"qmlhfl-mpi sweep: error: cannot start {cmd[0]!r}: {e}; give the launcher with --mpiexec PATH",
                  file=sys.stderr)
            return 2
        if rc != 0:
            print(f"qmlhfl-mpi sweep: run {i}/{len(runs)} (train.seed={r.seed}) exited with {rc}", file=sys.stderr)
            first_failure = first_failure or rc
    done = [r for r in runs if r.output.exists()]
    if not done:
        print("qmlhfl-mpi sweep: error: no run wrote its results file; nothing to report", file=sys.stderr)
        return first_failure or 2
    rp = argparse.ArgumentParser(prog="qmlhfl-mpi report")
    report.add_arguments(rp)
    print(f"sweep: qmlhfl-mpi report {shlex.join(report_argv(done, args.out_dir, name, args.target, args.no_plots))}",
          flush=True)
    rc = report.main(rp.parse_args(report_argv(done, args.out_dir, name, args.target, args.no_plots)))
    return first_failure or rc
