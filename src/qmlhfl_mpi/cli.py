"""`qmlhfl-mpi` command line: run | check | optimize | report.

The only module that touches ``MPI.COMM_WORLD``.  An unexpected exception on
any rank aborts the whole job (``Abort``) so no rank is left waiting in a
collective; expected problems (bad config, data, output) end every rank with
exit code 2 and one message.

Exit codes: 0 done; 1 aborted after an unexpected error on some rank; 2 bad
config, data, output or checkpoint (nothing changed); 3 diverged (results so
far kept); 74 a write failed; 75 stopped by SIGTERM/SIGUSR1 after writing a
checkpoint (continue with ``--resume``).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from typing import Sequence

from . import __version__
from .exitcodes import EXIT_ABORT, EXIT_LR_VIOLATED, EXIT_PREEMPTED



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
    r.add_argument("--quiet", action="store_true", help="no per-round table")

    ck = sub.add_parser("check", help="quantizers, message sizes, modelled time and the learning-rate condition")
    common(ck)
    ck.add_argument("--L", type=float, default=None, help="smoothness constant; estimated from the data if omitted")
    ck.add_argument("--strict", action="store_true",
                    help=f"exit {EXIT_LR_VIOLATED} if train.lr violates the learning-rate condition")

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
    op.add_argument("--random", type=int, default=1000, help="random feasible configurations to compare with")
    op.add_argument("--write", default=None, help="save the config with the optimal tau to this YAML file")
    op.add_argument("--overwrite", action="store_true", help="replace an existing --write file")

    from . import report
    rp = sub.add_parser("report", help="tables and plots from one or many HDF5 result files")
    report.add_arguments(rp)
    return p


def _print_row(row: dict, header: list[bool]) -> None:
    if not header[0]:
        print(f"{'round':>5} {'train_loss':>10} {'test_acc':>8} {'test_loss':>9} {'uplink_MB':>9} "
              f"{'compute_s':>9} {'codec_s':>7} {'comm_s':>7}", flush=True)
        header[0] = True
    acc = row["test_accuracy"]
    print(f"{row['round']:>5} {row['train_loss']:>10.4f} {acc:>8.4f} {row['test_loss']:>9.4f} "
          f"{row['uplink_bytes'].sum() / 1e6:>9.3f} {row['time_compute']:>9.2f} {row['time_codec']:>7.3f} "
          f"{row['time_comm']:>7.3f}", flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    # first of all, so a signal during start-up also ends in a clean stop
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    setup_logging(rank, args.log_level)
    try:
        from . import config
        from .comm import agree_on_error
        from .job import JobError, run_job

        cfg, msg = None, None
        try:
            cfg = config.load(args.config, args.set)
        except config.ConfigError as e:
            msg = str(e)
        msg = agree_on_error(comm, msg)
        if msg is not None:
            if rank == 0:
                print(f"qmlhfl-mpi: error: {msg}", file=sys.stderr, flush=True)
            return 2
        header = [args.quiet]
        try:
            summary = run_job(comm, cfg, overwrite=args.overwrite, resume=args.resume,
                              stop_requested=lambda: bool(stop),
                              on_round=None if args.quiet else (lambda row: _print_row(row, header)))
        except JobError as e:
            if rank == 0:
                kind = "stopped" if e.code == EXIT_PREEMPTED else "error"
                print(f"qmlhfl-mpi: {kind}: {e}", file=sys.stderr, flush=True)
            return e.code
        if rank == 0:
            print(f"done: {summary.rounds_done} rounds, final test accuracy {summary.final_accuracy:.4f}, "
                  f"results in {summary.path}", flush=True)
        return 0
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            raise
        sys.stderr.write(f"qmlhfl-mpi: rank {rank} failed, aborting the job:\n{traceback.format_exc()}")
        sys.stderr.flush()
        comm.Abort(EXIT_ABORT)
        return EXIT_ABORT


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command in ("check", "optimize"):
        from . import planner
        from .config import ConfigError
        from .datasets import DataError
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            cmd = planner.cmd_check if args.command == "check" else planner.cmd_optimize
            return cmd(args, lambda line: print(line, flush=True))
        except (ConfigError, DataError, ValueError) as e:
            print(f"qmlhfl-mpi: error: {e}", file=sys.stderr)
            return 2
    if args.command == "report":
        from . import report
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return report.main(args)
    raise AssertionError(args.command)
