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

``qmlhfl-mpi sweep --file FILE`` runs the lines of a sweep file instead (the
form ``jobs/sweep.sbatch`` reads: ``CONFIG [--set KEY=VALUE ...]`` per line,
``#`` comments), each with the output path its config and overrides give, then
reports over all their files (grouped by seeds); a comment line
``# report: ARGS`` adds ``ARGS`` to that report call (e.g. ``--target 0.8
--label-keys tau --out docs/img --prefix depth``), so a study is one command.
``--jobs J`` runs up to ``J`` runs at once (with ``--ranks 1`` on a J-core
machine: results do not depend on the rank count), each run's output then
going to ``<output>.log``; ``--continue`` skips the runs whose results file is
finished (status ``completed`` or ``diverged``: a rerun would end the same way)
and resumes (``run --resume``) the others (``preempted``, ``failed``, or cut
off while ``running``), so a long sweep can be run in pieces.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..config import ConfigError, load_config
from ..core.exitcodes import EXIT_OK, EXIT_USAGE
from ..results.reader import read_run
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

    def command(self, mpiexec: str, ranks: int, overwrite: bool, resume: bool = False) -> list[str]:
        """The local command line: ``mpiexec -n ranks python -m qmlhfl_mpi run ...``."""
        mode = ["--resume"] if resume else ["--overwrite"] if overwrite else []
        return [mpiexec, "-n", str(ranks), sys.executable, "-m", "qmlhfl_mpi", "run", *self.run_args, "--quiet",
                *mode]


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


def read_sweep_file(path: str | Path) -> tuple[list[SweepRun], list[str]]:
    """The runs of a sweep file (one ``CONFIG [--set KEY=VALUE ...]`` per non-blank, non-``#`` line, words
    split on blanks as ``jobs/sweep.sbatch`` splits them) and the words of its ``# report:`` lines.  Every
    line's config is loaded with its overrides, so a bad line fails here, before any run starts (raises
    :class:`SweepError` or :class:`~qmlhfl_mpi.config.ConfigError`, naming the line)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"--file {str(path)!r}: cannot read the sweep file ({e})") from None
    runs: list[SweepRun] = []
    report_words: list[str] = []
    seen: dict[Path, int] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            head, _, rest = line[1:].strip().partition(":")
            if head.strip() == "report":
                report_words += shlex.split(rest)
            continue
        if not line:
            continue
        words = line.split()
        where = f"{path}:{no}"
        config, opts, sets = words[0], words[1:], []
        i = 0
        while i < len(opts):
            if opts[i] == "--set" and i + 1 < len(opts):
                sets.append(opts[i + 1])
                i += 2
            elif opts[i].startswith("--set="):
                sets.append(opts[i][len("--set="):])
                i += 1
            else:
                raise SweepError(f"{where}: {opts[i]!r}: a sweep line is CONFIG followed by --set KEY=VALUE "
                                 "options only (the sweep adds --quiet, --overwrite or --resume itself)")
        if not Path(config).is_file():
            raise SweepError(f"{where}: config {config!r} not found (paths are relative to the directory the "
                             "sweep is started from)")
        try:
            cfg = load_config(config, sets)
        except ConfigError as e:
            raise SweepError(f"{where}: {e}") from None
        out = Path(cfg.output.path)
        if out in seen:
            raise SweepError(f"{where}: output.path {str(out)!r} is also the output of line {seen[out]}; give "
                             "every line its own --set output.path=...")
        seen[out] = no
        pseed = cfg.data.partition.seed
        runs.append(SweepRun(cfg.train.seed, pseed, out, (config, *[w for s_ in sets for w in ("--set", s_)])))
    if not runs:
        raise SweepError(f"--file {str(path)!r} holds no runs: write one 'CONFIG [--set KEY=VALUE ...]' per line")
    return runs, report_words


FINISHED = ("completed", "diverged")  # final outcomes: a rerun of the same config would end the same way


def finished_status(path: Path) -> str | None:
    """The status of the run in ``path`` if it is finished (:data:`FINISHED`), else ``None`` (running,
    preempted, failed, unreadable or missing: a run ``--continue`` resumes)."""
    try:
        status = read_run(path)["status"]
    except (OSError, KeyError, ValueError):
        return None
    return status if status in FINISHED else None


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
    p.add_argument("config", nargs="?", default=None, help="YAML config file (or give --file)")
    p.add_argument("--file", default=None, metavar="SWEEP_FILE",
                   help="run the lines of a sweep file (CONFIG [--set KEY=VALUE ...] per line, as jobs/sweep.sbatch "
                        "reads them) instead of one config over seeds; '# report: ARGS' lines add ARGS to the report")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S",
                   help="train.seed of the runs, e.g. --seeds 0 1 2 (one run each; needed with CONFIG)")
    p.add_argument("--partition-seeds", nargs="+", type=int, default=None, metavar="P",
                   help="data.partition.seed of the runs (the data split and generated data): every --seeds "
                        "value with every P; default: none set, the data follow train.seed")
    p.add_argument("--ranks", "-n", type=int, default=1, metavar="N", help="MPI ranks per run (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every run, e.g. --set train.lr=0.1 (repeatable)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="directory of the results files NAME-seedS.h5 and of the report (needed with CONFIG; with "
                        "--file, the report's directory, default: that of the first line's results file)")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="J",
                   help="runs at once (default 1); each run's output then goes to <results file>.log")
    p.add_argument("--continue", dest="cont", action="store_true",
                   help="skip the runs whose results file is finished (completed or diverged), resume (run --resume) "
                        "the others")
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


def _validate(args: argparse.Namespace) -> tuple[list[SweepRun], str, str, list[str]]:
    """The runs, the report's name and directory, and the extra report words (raises on bad arguments)."""
    if args.ranks < 1:
        raise SweepError(f"--ranks {args.ranks}: expected at least 1 MPI rank, e.g. --ranks 2")
    if args.jobs < 1:
        raise SweepError(f"--jobs {args.jobs}: expected at least 1 run at a time, e.g. --jobs 2")
    if args.target is not None and not 0 <= args.target <= 1:
        raise SweepError(f"--target {args.target}: expected an accuracy from 0 to 1, e.g. --target 0.8")
    if args.cont and args.overwrite:
        raise SweepError("--continue keeps the finished results and --overwrite replaces them: give one of them")
    if args.file is not None:
        if args.config is not None or args.seeds is not None or args.partition_seeds is not None or args.set:
            raise SweepError("--file runs the lines of a sweep file as they are: give no CONFIG, --seeds, "
                             "--partition-seeds or --set with it (write them into the file's lines)")
        if args.emit_sweep_file:
            raise SweepError("--file and --emit-sweep-file: the sweep file exists already; submit it with "
                             "sbatch --array=0-<lines-1> jobs/sweep.sbatch FILE")
        runs, words = read_sweep_file(args.file)
        _report_parser().parse_args(["check.h5", *words])  # a bad '# report:' line fails before any run
        name = args.name or Path(args.file).stem
        out_dir = args.out_dir or str(runs[0].output.parent)
        return runs, name, out_dir, words
    if args.config is None:
        raise SweepError("give a CONFIG with --seeds (e.g. sweep configs/quickstart.yaml --seeds 0 1 2 --out-dir "
                         "results/seeds), or a sweep file with --file")
    if args.seeds is None:
        raise SweepError("--seeds: give the train.seed of the runs, e.g. --seeds 0 1 2")
    if args.out_dir is None:
        raise SweepError("--out-dir: give the directory of the results files, e.g. --out-dir results/seeds")
    runs = plan(args.config, args.seeds, args.partition_seeds, args.set, args.out_dir, args.name)
    return runs, args.name or Path(args.config).stem, args.out_dir, []


class _ReportArgs(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SweepError(f"the sweep file's '# report:' line: {message} (it takes 'qmlhfl-mpi report' options, "
                         "e.g. '# report: --target 0.8 --label-keys tau')")


def _report_parser() -> argparse.ArgumentParser:
    rp = _ReportArgs(prog="qmlhfl-mpi report")
    report.add_arguments(rp)
    return rp


def _launch(cmd: list[str], log: Path | None) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)


def _run_all(todo: list[tuple[int, SweepRun, list[str]]], total: int, jobs: int) -> int:
    """Runs the commands, at most ``jobs`` at once; returns the first failed run's exit status (0: none)."""
    first_failure = 0
    waiting = list(todo)
    running: dict[subprocess.Popen[bytes], tuple[int, SweepRun]] = {}
    while waiting or running:
        while waiting and len(running) < jobs:
            i, r, cmd = waiting.pop(0)
            log = Path(str(r.output) + ".log") if jobs > 1 else None
            print(f"sweep: run {i}/{total}: {shlex.join(cmd)}" + (f" > {log}" if log else ""), flush=True)
            try:
                running[_launch(cmd, log)] = (i, r)
            except OSError as e:
                print(f"qmlhfl-mpi sweep: error: cannot start {cmd[0]!r}: {e}; give the launcher with --mpiexec "
                      "PATH", file=sys.stderr)
                for proc in running:
                    proc.wait()
                return EXIT_USAGE
        proc = _wait_any(list(running))
        rc = proc.wait()
        i, r = running.pop(proc)
        if rc != 0:
            print(f"qmlhfl-mpi sweep: run {i}/{total} ({r.output}) exited with {rc}", file=sys.stderr, flush=True)
            first_failure = first_failure or rc
        elif jobs > 1:
            print(f"sweep: run {i}/{total} done: {r.output}", flush=True)
    return first_failure


def _wait_any(procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """The first of ``procs`` to finish (polls every 0.2 s: the runs take seconds to hours)."""
    while True:
        for proc in procs:
            if proc.poll() is not None:
                return proc
        time.sleep(0.2)


def main(args: argparse.Namespace) -> int:
    """Run (or print, or emit) the sweep, then report; see the module docstring for the exit status."""
    try:
        runs, name, out_dir, extra = _validate(args)
        if args.emit_sweep_file:
            _emit(Path(args.emit_sweep_file), sweep_file_lines(runs), args.overwrite, out_dir, name)
            return EXIT_OK
        try:
            mpiexec = find_mpiexec(args.mpiexec)
        except SweepError:
            if not args.dry_run:
                raise
            mpiexec = "mpiexec"
        existing = [str(r.output) for r in runs if r.output.exists()]
        if existing and not (args.overwrite or args.cont) and not args.dry_run:
            raise SweepError(f"{existing[0]!r} exists ({len(existing)} of the {len(runs)} results files do): pass "
                             "--continue to keep the finished ones and complete the rest, --overwrite to replace "
                             "them, or choose another --out-dir or --name")
    except (SweepError, ConfigError) as e:
        print(f"qmlhfl-mpi sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    todo: list[tuple[int, SweepRun, list[str]]] = []
    for i, r in enumerate(runs, 1):
        if args.cont and r.output.exists():
            done_as = finished_status(r.output)
            if done_as is not None:
                print(f"sweep: run {i}/{len(runs)}: {r.output} is finished ({done_as}), skipped", flush=True)
                continue
            todo.append((i, r, r.command(mpiexec, args.ranks, False, resume=True)))
        else:
            todo.append((i, r, r.command(mpiexec, args.ranks, args.overwrite)))
    rargv = report_argv(runs, out_dir, name, args.target, args.no_plots) + extra
    if args.dry_run:
        for _, _, cmd in todo:
            print(shlex.join(cmd))
        print(shlex.join(["qmlhfl-mpi", "report", *rargv]))
        return EXIT_OK
    first_failure = _run_all(todo, len(runs), args.jobs)
    done = [r for r in runs if r.output.exists()]
    if not done:
        print("qmlhfl-mpi sweep: error: no run wrote its results file; nothing to report", file=sys.stderr)
        return first_failure or 2
    rargv = report_argv(done, out_dir, name, args.target, args.no_plots) + extra
    print(f"sweep: qmlhfl-mpi report {shlex.join(rargv)}", flush=True)
    rc = report.main(_report_parser().parse_args(rargv))
    return first_failure or rc
