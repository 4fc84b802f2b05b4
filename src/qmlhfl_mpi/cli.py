"""`qmlhfl-mpi` command line: run | check | optimize | plan | report | sweep.

The only module that touches ``MPI.COMM_WORLD``.  An unexpected exception on
any rank aborts the whole job (``Abort``) so no rank is left waiting in a
collective; expected problems (bad config, data, output) end every rank with
exit code 2 and one message.

``run`` is a thin layer over the Python API: ``load_config`` then
``Session(cfg, COMM_WORLD).run([SignalStop(CLI_STOP_SIGNALS, restore=False), ConsoleTable()])``.

Exit codes: 0 done; 1 aborted after an unexpected error on some rank (or a
callback failed); 2 bad config, data, plug-in, output or checkpoint (nothing
changed); 3 diverged (results so far kept); 74 a write failed; 75 stopped by
SIGTERM/SIGUSR1/SIGINT (Ctrl-C) or a callback after writing a checkpoint
(continue with ``--resume``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .core.exitcodes import (
    EXIT_ABORT,
    EXIT_DIVERGED,
    EXIT_IO,
    EXIT_LR_VIOLATED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
)

if TYPE_CHECKING:
    from .config import Config


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # rank 0 speaks for the job; the others report only warnings and errors
    root.setLevel(getattr(logging, level) if rank == 0 else max(logging.WARNING, getattr(logging, level)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmlhfl-mpi", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"qmlhfl-mpi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.1 (repeatable)")
        sp.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    r = sub.add_parser("run", help="train under mpiexec/srun and write the HDF5 results")
    common(r)
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing output file (and its checkpoint)")
    mode.add_argument("--resume", action="store_true",
                      help="continue the interrupted run in output.path from its checkpoint")
    r.add_argument("--rebuild-results", action="store_true",
                   help="with --resume: if the results file is missing or unreadable, write it anew from the "
                        "checkpoint (every round up to it) and keep the damaged one as <output>.damaged")
    r.add_argument("--quiet", action="store_true", help="no per-round table")

    ck = sub.add_parser("check", help="quantizers, message sizes, modelled time and the learning-rate condition")
    common(ck)
    ck.add_argument("--L", type=float, default=None, help="smoothness constant; estimated from the data if omitted")
    ck.add_argument("--strict", action="store_true",
                    help=f"exit {EXIT_LR_VIOLATED} if train.lr violates the learning-rate condition")
    ck.add_argument("--ranks", type=int, default=1, metavar="P",
                    help="MPI ranks the run will use, for the memory estimate per rank (default 1)")

    op = sub.add_parser("optimize", help="iteration counts tau that maximise convergence under a deadline")
    common(op)
    op.add_argument("--L", type=float, default=None, help="smoothness constant; estimated from the data if omitted")
    op.add_argument("--deadline", type=float, required=True, help="seconds of modelled time")
    op.add_argument("--lr", type=float, default=None,
                    help="learning rate the condition is checked with (default: train.lr; --write records it)")
    op.add_argument("--max-tau", type=int, default=50, help="largest tau_n searched (default 50)")
    op.add_argument("--sigma2", type=float, default=1.0, help="stochastic-gradient variance in the bound")
    op.add_argument("--gap0", type=float, default=1.0, help="initial optimality gap in the bound")
    op.add_argument("--zeta2", type=float, default=0.0, help="heterogeneity constant in the bound")
    op.add_argument("--zeta2-layers", type=float, nargs="+", default=None, metavar="Z",
                    help="per-layer heterogeneity zeta_1^2 .. zeta_N^2: use the per-layer bound "
                         "(docs/theory.md section 15; `check` prints estimates) instead of --zeta2")
    op.add_argument("--random", type=int, default=1000, help="random feasible configurations to compare with")
    op.add_argument("--write", default=None, help="save the config with the optimal tau to this YAML file")
    op.add_argument("--overwrite", action="store_true", help="replace an existing --write file")
    op.add_argument("--calibrate", action="store_true",
                    help="fit the bound's scale c (L_eff = c L) to short pilot runs at the configured lr, then "
                         "optimise with the calibrated bound (docs/theory.md section 16)")
    op.add_argument("--search", choices=("bound", "halving"), default="bound",
                    help="bound: minimise the convergence bound (default); halving: successive halving of pilot runs "
                         "on the virtual clock, scored by the validation loss (docs/theory.md section 18)")
    op.add_argument("--candidates", type=int, default=12, help="--search halving: space-filling candidates (12)")
    op.add_argument("--eta", type=int, default=3, help="--search halving: keep the best 1/eta at each rung (3)")
    op.add_argument("--validation", type=float, default=0.1,
                    help="--search halving: share of the training data the pilots hold out to score on (0.1; "
                         "data.validation when the config sets it)")
    op.add_argument("--tau-values", type=int, nargs="+", default=None, metavar="V",
                    help="--search halving: the values each tau_n may take (default 1, 2, 4, .. up to --max-tau)")
    op.add_argument("--levels-values", type=int, nargs="+", default=None, metavar="S",
                    help="--search halving: also choose each link's QSGD levels among these (0 = float32)")
    op.add_argument("--pilot-rounds", type=int, default=3, help="global rounds per pilot run (default 3, >= 2)")
    op.add_argument("--pilot-tau", action="append", default=None, metavar="T1,..,TN",
                    help="a pilot tau (repeat for more); default: flat-heavy, configured and frequent-aggregation "
                         "splits of the configured prod(tau)")

    pl = sub.add_parser("plan", help="the round plan: every aggregation of a round with its participants, weights "
                                     "and bytes (nothing is trained)")
    common(pl)
    from .analysis import plan_table
    plan_table.add_arguments(pl)

    tr = sub.add_parser("traces", help="write synthetic device-capacity and behaviour traces (docs/system.md)")
    tr.add_argument("out", help="directory for devices.csv and behaviour.csv")
    tr.add_argument("--devices", type=int, required=True, help="devices in the traces (>= 1)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    tr.add_argument("--step-seconds", type=float, default=0.01, help="median seconds per SGD step")
    tr.add_argument("--speed-sigma", type=float, default=0.5, help="lognormal sigma of the step times")
    tr.add_argument("--up-rate", type=float, default=1e7, help="median uplink bits/s (the downlink's is 4x)")
    tr.add_argument("--rate-sigma", type=float, default=0.5, help="lognormal sigma of the rates")
    tr.add_argument("--horizon", type=float, default=3600.0,
                    help="seconds of behaviour (give it as system.availability_period to repeat it)")
    tr.add_argument("--mean-online", type=float, default=600.0, help="mean seconds a device stays online")
    tr.add_argument("--mean-offline", type=float, default=300.0, help="mean seconds a device stays offline")
    tr.add_argument("--always-online", type=float, default=0.2, help="share of devices that never go offline")
    tr.add_argument("--overwrite", action="store_true", help="replace existing trace files")

    from .analysis import report
    rp = sub.add_parser("report", help="tables and plots from one or many HDF5 result files")
    report.add_arguments(rp)
    from .analysis import sweep
    sw = sub.add_parser("sweep", help="run a config once per seed (local mpiexec), then report; or write a "
                                      "sweep file for jobs/sweep.sbatch")
    sweep.add_arguments(sw)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    # first of all, so a signal during start-up also ends in a clean stop
    from .run.signals import CLI_STOP_SIGNALS, SignalStop

    # SIGINT too: Ctrl-C at mpiexec reaches every rank and must stop cleanly, not raise KeyboardInterrupt;
    # kept until the process exits: a late signal must not kill a rank
    stopper = SignalStop(CLI_STOP_SIGNALS, restore=False)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    setup_logging(rank, args.log_level)

    def say(kind: str, text: str) -> None:
        if rank == 0:
            print(f"qmlhfl-mpi: {kind}: {text}", file=sys.stderr, flush=True)

    try:
        from .comm.collectives import agree_on_error
        from .config import ConfigError, load_config
        from .run.console import ConsoleTable
        from .run.errors import RunError
        from .run.session import Session

        cfg, msg = None, None
        try:
            cfg = load_config(args.config, args.set)
        except ConfigError as e:
            msg = str(e)
        if args.rebuild_results and not args.resume:
            msg = "--rebuild-results rebuilds the results file of an interrupted run: use it with --resume"
        msg = agree_on_error(comm, msg)
        if msg is not None or cfg is None:
            say("error", str(msg))
            return EXIT_USAGE
        try:
            session = Session(cfg, comm)
            summary = session.run([stopper] + ([] if args.quiet else [ConsoleTable()]),
                                  overwrite=args.overwrite, resume=args.resume,
                                  rebuild_results=args.rebuild_results)
        except RunError as e:
            say("stopped" if e.code == EXIT_PREEMPTED else "error", str(e))
            return e.code
        if summary.status == "preempted":
            why = f"{stopper.reason} received; " if stopper.received else ""
            say("stopped", f"{why}{summary.message} (exit code {EXIT_PREEMPTED})")
            return EXIT_PREEMPTED
        if summary.status == "diverged":
            say("error", summary.message)
            return EXIT_DIVERGED
        if summary.status == "budget_spent":
            say("done", summary.message)
            return EXIT_OK
        if rank == 0:
            print(f"done: {summary.rounds_done} rounds, final test accuracy {summary.final_accuracy:.4f}, "
                  f"results in {summary.path}", flush=True)
        return EXIT_OK
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            raise
        sys.stderr.write(f"qmlhfl-mpi: rank {rank} failed, aborting the job:\n{traceback.format_exc()}")
        sys.stderr.flush()
        comm.Abort(EXIT_ABORT)
        return EXIT_ABORT
    finally:
        # The run is over.  Python's finalisation resets Python-level handlers to the default action
        # before mpi4py's MPI_Finalize runs, so a late SIGTERM/SIGUSR1 (scancel, the batch script
        # forwarding one) would kill the rank there; ignored signals stay ignored.
        import signal

        for sig in CLI_STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def _pilot_runner(cfg: Config, resume: bool = False) -> str:
    """Run one pilot in this process (``MPI.COMM_SELF``), or continue it (``resume``); its results file path."""
    from mpi4py import MPI

    from .run.session import Session

    summary = Session(cfg, MPI.COMM_SELF).run(overwrite=not resume, resume=resume)
    if summary.status == "preempted":
        raise ValueError(f"pilot run with tau={list(cfg.tau)} was stopped ({summary.message}): rerun optimize")
    return summary.path


def _analysis(command: Callable[[argparse.Namespace, Callable[[str], None]], int]
              ) -> Callable[[argparse.Namespace], int]:
    """A serial command that prints lines: bad input (config, data, values) is one message and exit 2."""
    def run(args: argparse.Namespace) -> int:
        from .config import ConfigError
        from .data.source import DataError
        try:
            return command(args, lambda line: print(line, flush=True))
        except (ConfigError, DataError, ValueError) as e:
            print(f"qmlhfl-mpi: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    return run


def _check(args: argparse.Namespace, write: Callable[[str], None]) -> int:
    from .analysis import planner
    return planner.cmd_check(args, write)


def _optimize(args: argparse.Namespace, write: Callable[[str], None]) -> int:
    from .analysis import optimizer
    return optimizer.cmd_optimize(args, write, run_pilot=_pilot_runner)


def _plan(args: argparse.Namespace, write: Callable[[str], None]) -> int:
    from .analysis import plan_table
    return plan_table.cmd_plan(args, write)


def _traces(args: argparse.Namespace) -> int:
    """Write ``devices.csv`` and ``behaviour.csv`` (never over existing files without ``--overwrite``)."""
    from pathlib import Path

    from .core.tracegen import TraceShape, availability_rows, device_rows, write_csv
    try:
        shape = TraceShape(args.devices, args.step_seconds, args.speed_sigma, args.up_rate, args.rate_sigma,
                           args.horizon, args.mean_online, args.mean_offline, args.always_online)
    except ValueError as e:
        print(f"qmlhfl-mpi traces: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    files = {out / "devices.csv": device_rows(shape, args.seed), out / "behaviour.csv": availability_rows(shape, args.seed)}
    there = [str(p) for p in files if p.exists()]
    if there and not args.overwrite:
        print(f"qmlhfl-mpi traces: error: {', '.join(there)} exist(s); pass --overwrite to replace or choose "
              "another directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, cols in files.items():
            write_csv(path, cols)
    except OSError as e:
        print(f"qmlhfl-mpi traces: error: writing {out}: {e}", file=sys.stderr)
        return EXIT_IO
    print(f"wrote {out / 'devices.csv'} ({shape.devices} devices) and {out / 'behaviour.csv'} "
          f"({len(files[out / 'behaviour.csv']['device'])} online intervals over {shape.horizon:g} s)")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from .analysis import report
    return report.main(args)


def _sweep(args: argparse.Namespace) -> int:
    from .analysis import sweep
    return sweep.main(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "check": _analysis(_check), "optimize": _analysis(_optimize), "plan": _analysis(_plan),
    "report": _report, "sweep": _sweep, "traces": _traces,
}
"""Each subcommand's handler; it returns the process exit code (:mod:`qmlhfl_mpi.core.exitcodes`)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "run":  # run sets up its own logging, with the rank
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[args.command](args)
