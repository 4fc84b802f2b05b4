"""`qmlhfl-mpi report`: a text table and PNG plots from one or many HDF5 result files.

For every file the table gives the run's name (its file stem), its status, the
rounds done, the final and best test accuracy, the uplink bytes of every link
summed over the run, the measured wall time, the modelled time of the deadline
model and, last, its label.  The plots overlay all runs: test accuracy against
the global round, against the cumulative uplink bytes (all links), against the
measured wall time and, where the files hold finite values, against the
modelled time.

Labels come from the configs: each file's ``config_yaml`` attribute is
flattened to dotted keys, and a run is labelled by the keys whose values differ
between the given files (``output.path`` and the other ``output.*`` keys are
ignored).  A single file, or files whose configs do not differ, are labelled
by their file names.

Definitions (all read from ``/metrics``); rounds are counted from 1 here:
"round k" is the state after k global rounds, stored at ``/metrics/round == k-1``.

* wall time after round k = ``sum_{r<k} (time_round[r] + time_eval[r])``
* cumulative uplink bytes after round k = ``sum_{r<k} sum_n uplink_bytes[r, n]``
* modelled time after round k = ``sum_{r<k} modelled_time[r]``
* rounds that were not evaluated have a NaN test accuracy; they are skipped in
  the plots, and "final" is the last evaluated accuracy.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import flatten
from ..results import ResultsFileError, read_run

IGNORED_PREFIXES = ("output.",)  # where and how results are written: never what differs between experiments
PLOTS = {  # file suffix -> (x label, attribute of Run holding the x values)
    "acc_vs_round": ("global round", "rounds_x"),
    "acc_vs_uplink": ("cumulative uplink traffic, all links (MB)", "uplink_x"),
    "acc_vs_walltime": ("measured wall time (s)", "wall_x"),
    "acc_vs_modelled_time": ("modelled time, deadline model (s)", "modelled_x"),
}


class ReportError(ValueError):
    """A file cannot be reported on; the message names the file and the reason."""


@dataclass
class Run:
    """One results file, reduced to what the table and the plots need."""

    path: Path
    config: dict[str, Any]            # flattened config, dotted keys
    status: str
    rounds: np.ndarray                # global round index of every recorded round
    accuracy: np.ndarray              # test accuracy per round (NaN where not evaluated)
    uplink_bytes: np.ndarray          # (rounds, N) int64
    wall: np.ndarray                  # cumulative wall seconds after each round
    modelled: np.ndarray              # cumulative modelled seconds after each round (may be NaN)
    label: str = ""                   # legend text: the config keys that differ
    name: str = ""                    # table name: file stem (the path if stems clash)

    @property
    def evaluated(self) -> np.ndarray:
        return np.isfinite(self.accuracy)

    @property
    def rounds_done(self) -> int:
        return int(self.rounds.shape[0])

    @property
    def num_links(self) -> int:
        return int(self.uplink_bytes.shape[1]) if self.uplink_bytes.ndim == 2 else 0

    @property
    def final_accuracy(self) -> float:
        acc = self.accuracy[self.evaluated]
        return float(acc[-1]) if acc.size else math.nan

    @property
    def best(self) -> tuple[float, int]:
        """(best test accuracy, after how many rounds); (NaN, 0) if never evaluated."""
        ok = self.evaluated
        if not ok.any():
            return math.nan, 0
        i = int(np.flatnonzero(ok)[np.argmax(self.accuracy[ok])])
        return float(self.accuracy[i]), int(self.rounds[i]) + 1

    @property
    def link_totals(self) -> np.ndarray:
        return self.uplink_bytes.sum(axis=0) if self.rounds_done else np.zeros(self.num_links, dtype=np.int64)

    @property
    def wall_time(self) -> float:
        return float(self.wall[-1]) if self.rounds_done else 0.0

    @property
    def modelled_time(self) -> float:
        return float(self.modelled[-1]) if self.rounds_done else math.nan

    # x values of the plots (all rounds; the plots keep the evaluated ones)
    @property
    def rounds_x(self) -> np.ndarray:
        return self.rounds.astype(np.float64) + 1.0  # /metrics/round t holds the state after t+1 rounds

    @property
    def uplink_x(self) -> np.ndarray:
        return np.cumsum(self.uplink_bytes.sum(axis=1)) / 1e6 if self.rounds_done else np.zeros(0)

    @property
    def wall_x(self) -> np.ndarray:
        return self.wall

    @property
    def modelled_x(self) -> np.ndarray:
        return self.modelled

    def reached(self, target: float) -> tuple[int, float, float] | None:
        """(rounds done, wall seconds, modelled seconds) when the test accuracy first reached ``target``."""
        hit = np.flatnonzero(self.evaluated & (np.nan_to_num(self.accuracy, nan=-1.0) >= target))
        if not hit.size:
            return None
        i = int(hit[0])
        return int(self.rounds[i]) + 1, float(self.wall[i]), float(self.modelled[i])


# ---- reading ---------------------------------------------------------------
def load_run(path: str | Path) -> Run:
    """Read one results file; raises :class:`ReportError` naming the file."""
    p = Path(path)
    try:
        raw = read_run(p)
    except ResultsFileError as e:
        raise ReportError(str(e)) from None
    m, text, status = raw["metrics"], raw["config_yaml"], raw["status"]

    def col(name: str) -> np.ndarray:
        return np.asarray(m[name], dtype=np.float64) if name in m else np.zeros(m["round"].shape[0])

    rounds = np.asarray(m["round"], dtype=np.int64)
    acc = col("test_accuracy")
    ub = np.asarray(m["uplink_bytes"], dtype=np.int64)
    wall = np.cumsum(col("time_round") + col("time_eval"))
    modelled = np.cumsum(col("modelled_time")) if "modelled_time" in m else np.full(rounds.shape, np.nan)
    if ub.ndim != 2 or ub.shape[0] != rounds.shape[0]:
        raise ReportError(f"{str(p)!r}: /metrics/uplink_bytes has shape {ub.shape}, expected "
                          f"({rounds.shape[0]}, N); the file is damaged or not a qmlhfl-mpi results file")
    try:
        cfg = yaml.safe_load(str(text)) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"{str(p)!r}: the 'config_yaml' attribute is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ReportError(f"{str(p)!r}: the 'config_yaml' attribute does not hold a mapping")
    return Run(path=p, config=flatten(cfg), status=str(status), rounds=rounds, accuracy=acc,
               uplink_bytes=ub, wall=wall, modelled=modelled)


def _fmt_value(v: Any, key: str = "") -> str:
    if key == "quantizer.levels" and isinstance(v, list):  # 0 means float32, as in the configs
        v = ["none" if x == 0 else x for x in v]
    if isinstance(v, list):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def differing_keys(configs: Sequence[dict[str, Any]], ignore: Sequence[str] = IGNORED_PREFIXES) -> list[str]:
    """Dotted keys whose values are not the same in all ``configs`` (in config order);
    keys starting with one of ``ignore`` (``output.path`` and the other output keys) are skipped."""
    keys: list[str] = []
    for c in configs:
        keys += [k for k in c if k not in keys]
    return [k for k in keys if not k.startswith(tuple(ignore))
            and len({repr(c[k]) if k in c else "<absent>" for c in configs}) > 1]


def assign_labels(runs: Sequence[Run], keys: Sequence[str] | None = None) -> list[str]:
    """Label every run by the config keys that differ (or by ``keys``), else by its file stem."""
    if keys is None:
        keys = differing_keys([r.config for r in runs]) if len(runs) > 1 else []
    else:
        unknown = [k for k in keys if not any(k in r.config for r in runs)]
        if unknown:
            valid = sorted({k for r in runs for k in r.config})
            raise ReportError(f"--label-keys: {unknown} not in the configs of these files; "
                              f"valid keys: {', '.join(valid)}")
    labels = [", ".join(f"{k}={_fmt_value(r.config.get(k, '<absent>'), k)}" for k in keys) for r in runs]
    names = [r.path.stem for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.path) for r in runs]
    if not keys or len(set(labels)) < len(labels):
        labels = [f"{s}: {lab}" if lab else s for s, lab in zip(names, labels)]
    for r, name, lab in zip(runs, names, labels):
        r.name, r.label = name, lab
    return labels


# ---- table -------------------------------------------------------------------
def table_rows(runs: Sequence[Run], target: float | None = None) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows (exact values: bytes as integers, seconds as floats)."""
    n_links = max((r.num_links for r in runs), default=0)
    header = ["run", "status", "rounds", "final_acc", "best_acc", "best_round"]
    header += [f"uplink_bytes_L{n}" for n in range(1, n_links + 1)] + ["uplink_bytes_total", "wall_s", "modelled_s"]
    if target is not None:
        header += ["rounds_to_target", "wall_s_to_target", "modelled_s_to_target"]
    header.append("label")
    rows = []
    for r in runs:
        best, best_round = r.best
        totals = r.link_totals
        row: list[Any] = [r.name, r.status, r.rounds_done, r.final_accuracy, best, best_round]
        row += [int(totals[n]) if n < r.num_links else "" for n in range(n_links)]
        row += [int(totals.sum()), r.wall_time, r.modelled_time]
        if target is not None:
            hit = r.reached(target)
            row += list(hit) if hit else ["", "", ""]
        row.append(r.label)
        rows.append(row)
    return header, rows


def _fmt_cell(name: str, v: Any) -> str:
    if v == "" or v is None:
        return "-"
    if name.startswith("uplink_bytes"):
        return f"{v / 1e6:.3f}"
    if name.endswith("acc"):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    if name.endswith("_s") or name.endswith("_to_target"):
        return f"{v:.1f}" if isinstance(v, float) and math.isfinite(v) else ("-" if isinstance(v, float) else str(v))
    return str(v)


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """Fixed-width text table; byte columns in MB (10^6 bytes)."""
    shown = [h.replace("uplink_bytes_", "uplink_MB_") for h in header]
    cells = [[_fmt_cell(h, v) for h, v in zip(header, row)] for row in rows]
    widths = [max(len(s), *(len(c[i]) for c in cells)) if cells else len(s) for i, s in enumerate(shown)]
    text_cols = (0, len(shown) - 1)  # name and label: left-aligned; numbers: right-aligned

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in text_cols else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(shown), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([repr(v) if isinstance(v, float) else v for v in row])


# ---- plots -------------------------------------------------------------------
def plot_runs(runs: Sequence[Run], out_dir: Path, prefix: str, title: str | None = None) -> list[Path]:
    """Write the PNG plots; returns their paths.  The modelled-time plot is
    drawn only if some run has finite modelled times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, (xlabel, attr) in PLOTS.items():
        series = []
        for r in runs:
            x, ok = getattr(r, attr), r.evaluated
            ok = ok & np.isfinite(x)
            if ok.any():
                series.append((r.label, x[ok], r.accuracy[ok]))
        if not series:
            continue
        below = max(len(s[0]) for s in series) > 45  # long labels: legend under the axes, wrapped
        texts = [textwrap.fill(s[0], 100, break_long_words=False) if below else s[0] for s in series]
        lines = sum(t.count("\n") + 1 for t in texts)
        fig, ax = plt.subplots(figsize=(7.0, 4.4 + (0.16 * lines + 0.3 if below else 0)), dpi=100)
        for text, (_, x, y) in zip(texts, series):
            ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, linewidth=1.4, label=text)
        finals = [s[1][-1] for s in series if s[1][-1] > 0]
        if attr == "uplink_x" and finals and max(finals) / min(finals) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title, fontsize=10)
        if below:
            ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)
        else:
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"{prefix}_{suffix}.png"
        fig.savefig(path, bbox_inches="tight" if below else None)
        plt.close(fig)
        written.append(path)
    return written


# ---- command -----------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="HDF5 result files written by 'qmlhfl-mpi run'")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for the PNG plots (default: the directory of the first file)")
    p.add_argument("--prefix", default=None,
                   help="file name prefix of the plots (default: the file stem for one file, 'report' for several)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table, exact values, as CSV")
    p.add_argument("--target", type=float, default=None, metavar="ACC",
                   help="add the rounds, wall and modelled seconds at which the test accuracy first reached ACC "
                        "(e.g. 0.8)")
    p.add_argument("--title", default=None, help="title of the plots")
    p.add_argument("--label-keys", default=None, metavar="KEY,...",
                   help="label runs by these dotted config keys (default: the keys whose values differ)")
    p.add_argument("--no-plots", action="store_true", help="print the table only")


def main(args: argparse.Namespace) -> int:
    try:
        if args.target is not None and not 0 <= args.target <= 1:
            raise ReportError(f"--target {args.target}: expected an accuracy from 0 to 1, e.g. --target 0.8")
        runs = [load_run(f) for f in args.files]
        keys = [k.strip() for k in args.label_keys.split(",") if k.strip()] if args.label_keys else None
        assign_labels(runs, keys)
    except ReportError as e:
        print(f"qmlhfl-mpi report: error: {e}", file=sys.stderr)
        return 2
    header, rows = table_rows(runs, args.target)
    print(format_table(header, rows))
    if args.csv:
        try:
            write_csv(Path(args.csv), header, rows)
        except OSError as e:
            print(f"qmlhfl-mpi report: error: cannot write --csv {args.csv!r}: {e}", file=sys.stderr)
            return 2
        print(f"table written to {args.csv}")
    if not args.no_plots:
        out = Path(args.out) if args.out else runs[0].path.parent
        prefix = args.prefix or (runs[0].path.stem if len(runs) == 1 else "report")
        try:
            paths = plot_runs(runs, out, prefix, args.title)
        except OSError as e:
            print(f"qmlhfl-mpi report: error: cannot write the plots to {str(out)!r}: {e}", file=sys.stderr)
            return 2
        for path in paths:
            print(f"plot written to {path}")
        if paths and not any(p.name.endswith("acc_vs_modelled_time.png") for p in paths):
            print("no finite modelled times in these files: modelled-time plot skipped")
        if not paths:
            print("no evaluated rounds in these files: no plots drawn")
    return 0
