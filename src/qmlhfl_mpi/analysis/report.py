"""`qmlhfl-mpi report`: a text table and PNG plots from one or many HDF5 result files.

Runs are first grouped by seed: files whose configs differ only in the seeds
(:data:`SEED_KEYS`: ``train.seed`` and ``data.partition.seed``), in ``output.*``
and in the other keys a resume may change (``RESUME_FREE_KEYS``: the number of
rounds, threads, timeouts, callbacks) form one group, in the order of their
first file.  For every group the table gives its name (the file stem for one
file, else the stems' common prefix without its ``-seed`` part), ``n`` (the
number of runs in it), the status(es), the rounds done, the final and best test
accuracy, the round of the best, the final test loss, the uplink bytes of every
link summed over the run, the measured wall time, the virtual time of the
clock (docs/system.md) and, last, its label; every number is the mean over the group's
runs followed by ``±`` its sample standard deviation (``ddof=1``; none for
``n = 1``).  The CSV holds the exact mean in the column and the standard
deviation in a ``<column>_std`` column next to it (empty for ``n = 1``), and the
seeds and files of each group.  With ``--target`` the rounds to the target are
the median and the range (min-max) over the runs that reached it, with how many
did (``reached_target``: ``k/n``); the wall seconds to the target are the
median over the same runs, the virtual seconds the median and the range.  ``--no-group`` gives one row per file instead
(no ``n`` and no ``_std`` columns).

The plots overlay all groups (or runs): test accuracy against the global round,
against the cumulative uplink bytes (all links), against the measured wall time
and, where the files hold finite values, against the virtual time.  A group is
drawn as its mean curve with a band of ±1 standard deviation: at every global
round evaluated in some of its runs, the mean and the std of the test accuracy
over those runs, plotted at the mean x value of those runs (their x values
differ for the wall time, and for the bytes under client sampling).

Labels come from the configs: each file's ``config_yaml`` attribute is
flattened to dotted keys, and a group (or, with ``--no-group``, a run) is
labelled by the keys whose values differ between the groups (runs); the keys
ignored in grouping (``output.*`` always) are not labels.  A single group, or
groups whose configs do not differ, are labelled by their names.

Definitions (all read from ``/metrics``); rounds are counted from 1 here:
"round k" is the state after k global rounds, stored at ``/metrics/round == k-1``.

* wall time after round k = ``sum_{r<k} (time_round[r] + time_eval[r])``
* cumulative uplink bytes after round k = ``sum_{r<k} sum_n uplink_bytes[r, n]``
* virtual time after round k = ``virtual_time[k-1]`` (files from before the clock:
  ``sum_{r<k} modelled_time[r]``, the closed form the clock reproduces when every device
  and link is alike and nobody is sampled or dropped)
* rounds that were not evaluated have a NaN test accuracy; they are skipped in
  the plots, and "final" is the last evaluated accuracy (and test loss).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import RESUME_FREE_KEYS, flatten
from ..core.exitcodes import EXIT_OK, EXIT_USAGE
from ..results import ResultsFileError, read_run

IGNORED_PREFIXES = ("output.",)  # where and how results are written: never what differs between experiments
SEED_KEYS = ("train.seed", "data.partition.seed")  # the runs of one group differ only in these (and the next)
GROUP_FREE_KEYS = SEED_KEYS + tuple(RESUME_FREE_KEYS)  # ignored, with IGNORED_PREFIXES, when grouping
PLOTS = {  # file suffix -> (x label, attribute of Run holding the x values)
    "acc_vs_round": ("global round", "rounds_x"),
    "acc_vs_uplink": ("cumulative uplink traffic, all links (MB)", "uplink_x"),
    "acc_vs_walltime": ("measured wall time (s)", "wall_x"),
    "acc_vs_virtual_time": ("virtual time, system model (s)", "virtual_x"),
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
    loss: np.ndarray                  # test loss per round (NaN where not evaluated)
    uplink_bytes: np.ndarray          # (rounds, N) int64
    wall: np.ndarray                  # cumulative wall seconds after each round
    virtual: np.ndarray               # virtual seconds after each round (the clock's; may be NaN)
    label: str = ""                   # legend text: the config keys that differ
    name: str = ""                    # table name: file stem (the path if stems clash)
    epsilon: np.ndarray | None = None  # privacy's epsilon after each round (NaN: no privacy; None: older file)

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
    def final_loss(self) -> float:
        """The test loss of the last evaluated round (NaN if never evaluated)."""
        loss = self.loss[self.evaluated & np.isfinite(self.loss)]
        return float(loss[-1]) if loss.size else math.nan

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
    def virtual_time(self) -> float:
        return float(self.virtual[-1]) if self.rounds_done else math.nan

    @property
    def final_epsilon(self) -> float:
        """Epsilon after the last round (docs/privacy.md; NaN without privacy, inf without noise)."""
        return float(self.epsilon[-1]) if self.epsilon is not None and self.rounds_done else math.nan

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
    def virtual_x(self) -> np.ndarray:
        return self.virtual

    def last_accuracy(self, k: int) -> float:
        """The mean test accuracy over the last ``k`` evaluated rounds (fewer if fewer were; NaN if none):
        steadier than the final accuracy of one noisy curve."""
        acc = self.accuracy[self.evaluated]
        return float(acc[-k:].mean()) if acc.size else math.nan

    def accuracy_at_time(self, t: float) -> float:
        """The test accuracy of the last evaluated round whose virtual time is at most ``t`` seconds (a
        deadline); NaN if no evaluated round fits or the file has no virtual times."""
        ok = np.flatnonzero(self.evaluated & np.isfinite(self.virtual) & (self.virtual <= t * (1 + 1e-12)))
        return float(self.accuracy[ok[-1]]) if ok.size else math.nan

    def reached(self, target: float) -> tuple[int, float, float] | None:
        """(rounds done, wall seconds, virtual seconds) when the test accuracy first reached ``target``."""
        hit = np.flatnonzero(self.evaluated & (np.nan_to_num(self.accuracy, nan=-1.0) >= target))
        if not hit.size:
            return None
        i = int(hit[0])
        return int(self.rounds[i]) + 1, float(self.wall[i]), float(self.virtual[i])


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
    if "virtual_time" in m and np.isfinite(col("virtual_time")).all():
        virtual = col("virtual_time")  # the clock's (docs/system.md), cumulative
    else:  # a file from before the clock: the closed form, of which the clock's time is the generalisation
        virtual = np.cumsum(col("modelled_time")) if "modelled_time" in m else np.full(rounds.shape, np.nan)
    if ub.ndim != 2 or ub.shape[0] != rounds.shape[0]:
        raise ReportError(f"{str(p)!r}: /metrics/uplink_bytes has shape {ub.shape}, expected "
                          f"({rounds.shape[0]}, N); the file is damaged or not a qmlhfl-mpi results file")
    try:
        cfg = yaml.safe_load(str(text)) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"{str(p)!r}: the 'config_yaml' attribute is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ReportError(f"{str(p)!r}: the 'config_yaml' attribute does not hold a mapping")
    loss = col("test_loss") if "test_loss" in m else np.full(rounds.shape, np.nan)
    return Run(path=p, config=flatten(cfg), status=str(status), rounds=rounds, accuracy=acc, loss=loss,
               uplink_bytes=ub, wall=wall, virtual=virtual, epsilon=col("epsilon") if "epsilon" in m else None)


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
Extra = Sequence[tuple[str, Callable[[Run], float]]]  # (column, per-run value): --last, --at-time


def extra_columns(last: int | None = None, at_time: float | None = None) -> list[tuple[str, Callable[[Run], float]]]:
    """The optional per-run columns: ``last{K}_mean_acc`` (:meth:`Run.last_accuracy`) and ``at_{T}s_acc``
    (:meth:`Run.accuracy_at_time`)."""
    cols: list[tuple[str, Callable[[Run], float]]] = []
    if last is not None:
        cols.append((f"last{last}_mean_acc", lambda r: r.last_accuracy(last)))
    if at_time is not None:
        cols.append((f"at_{at_time:g}s_acc", lambda r: r.accuracy_at_time(at_time)))
    return cols


def table_rows(runs: Sequence[Run], target: float | None = None, extra: Extra = ()) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows (exact values: bytes as integers, seconds as floats)."""
    n_links = max((r.num_links for r in runs), default=0)
    header = ["run", "status", "rounds", "final_acc", *(c for c, _ in extra), "best_acc", "best_round", "final_loss"]
    header += [f"uplink_bytes_L{n}" for n in range(1, n_links + 1)] + ["uplink_bytes_total", "wall_s", "virtual_s",
                                                                        "epsilon"]
    if target is not None:
        header += ["rounds_to_target", "wall_s_to_target", "virtual_s_to_target"]
    header.append("label")
    rows = []
    for r in runs:
        best, best_round = r.best
        totals = r.link_totals
        row: list[Any] = [r.name, r.status, r.rounds_done, r.final_accuracy, *(f(r) for _, f in extra), best,
                          best_round, r.final_loss]
        row += [int(totals[n]) if n < r.num_links else "" for n in range(n_links)]
        row += [int(totals.sum()), r.wall_time, r.virtual_time, r.final_epsilon]
        if target is not None:
            hit = r.reached(target)
            row += list(hit) if hit else ["", "", ""]
        row.append(r.label)
        rows.append(row)
    return header, rows


# ---- groups of seeds ------------------------------------------------------------
def _free_in_groups(key: str) -> bool:
    """Whether ``key`` may differ between the runs of one group: the seeds, ``output.*`` and the
    resume-free keys (:data:`GROUP_FREE_KEYS`)."""
    return key.startswith(IGNORED_PREFIXES) or any(key == k or key.startswith(k + ".") for k in GROUP_FREE_KEYS)


@dataclass
class Group:
    """The runs of one config that differ only in their seeds (and in the keys :func:`_free_in_groups` allows)."""

    runs: list[Run] = field(default_factory=list)
    label: str = ""                   # legend text: the config keys that differ between the groups
    name: str = ""                    # table name: the file stem, or the stems' common prefix

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def status(self) -> str:
        """The runs' status, or ``status:count,...`` where they differ."""
        counts = Counter(r.status for r in self.runs)
        return self.runs[0].status if len(counts) == 1 else ",".join(f"{s}:{c}" for s, c in counts.items())


def group_key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What the runs of one group share: the flattened config without the keys free in groups."""
    return tuple(sorted((k, repr(v)) for k, v in config.items() if not _free_in_groups(k)))


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs whose configs differ only in seeds (see :func:`group_key`), in the order of their first run."""
    groups: dict[tuple[tuple[str, str], ...], Group] = {}
    for r in runs:
        groups.setdefault(group_key(r.config), Group()).runs.append(r)
    return list(groups.values())


_SEED_TAIL = re.compile(r"(?i)[-_.=]*(p?seed[-_.=]*\d*)?[-_.=]*$")


def _group_name(paths: Sequence[Path], full: bool) -> str:
    """The file stem (``full``: the path) of one file; for several, their common prefix without a trailing
    ``-seed`` part (``q4-seed0``, ``q4-seed1`` -> ``q4``), else the first one and ``+k`` more."""
    if len(paths) == 1:
        return str(paths[0]) if full else paths[0].stem
    texts = [str(p.with_suffix("")) if full else p.stem for p in paths]
    name = _SEED_TAIL.sub("", os.path.commonprefix(texts), count=1)
    return name if name and not name.endswith(os.sep) else f"{texts[0]}+{len(texts) - 1}"


def assign_group_labels(groups: Sequence[Group], keys: Sequence[str] | None = None) -> list[str]:
    """Name every group and label it by the config keys that differ between the groups (or by ``keys``;
    a key whose value differs inside a group shows the set ``{a,b}``), else by its name."""
    runs = [r for g in groups for r in g.runs]
    if keys is None:
        keys = ([k for k in differing_keys([g.config for g in groups]) if not _free_in_groups(k)]
                if len(groups) > 1 else [])
    else:
        unknown = [k for k in keys if not any(k in r.config for r in runs)]
        if unknown:
            valid = sorted({k for r in runs for k in r.config})
            raise ReportError(f"--label-keys: {unknown} not in the configs of these files; "
                              f"valid keys: {', '.join(valid)}")

    def value(g: Group, key: str) -> str:
        vals = list(dict.fromkeys(_fmt_value(r.config.get(key, "<absent>"), key) for r in g.runs))
        return vals[0] if len(vals) == 1 else "{" + ",".join(vals) + "}"

    labels = [", ".join(f"{k}={value(g, k)}" for k in keys) for g in groups]
    names = [_group_name([r.path for r in g.runs], full=False) for g in groups]
    if len(set(names)) < len(names):
        names = [_group_name([r.path for r in g.runs], full=True) for g in groups]
    if len(set(names)) < len(names):
        names = [f"{s}#{i}" for i, s in enumerate(names, 1)]
    if not keys or len(set(labels)) < len(labels):
        labels = [f"{s}: {lab}" if lab else s for s, lab in zip(names, labels)]
    for g, name, lab in zip(groups, names, labels):
        g.name, g.label = name, lab
    return labels


def _mean_std(values: Sequence[Any]) -> tuple[Any, Any]:
    """numpy's mean and sample std (``ddof=1``) of the values that are not ``None``; the mean stays an
    integer when all values are integers and it is one; the std is ``""`` for fewer than two values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "", ""
    arr = np.asarray(vals, dtype=np.float64)
    mean: Any = float(np.mean(arr))
    if all(isinstance(v, (int, np.integer)) for v in vals) and mean.is_integer():
        mean = int(mean)
    return mean, float(np.std(arr, ddof=1)) if len(vals) > 1 else ""


def _median(values: Sequence[float]) -> Any:
    m = float(np.median(np.asarray(values, dtype=np.float64)))
    return int(m) if m.is_integer() and all(isinstance(v, int) for v in values) else m


CSV_ONLY = ("seeds", "partition_seeds", "files")  # group columns the text table leaves out


def group_rows(groups: Sequence[Group], target: float | None = None,
               extra: Extra = ()) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows, one per group: the mean and the sample std (``<column>_std``; ``""`` for
    ``n = 1``) of every per-run number of :func:`table_rows`; with ``target``, the median, min and max
    of the rounds to it over the runs that reached it, how many did, and the medians of their seconds."""
    n_links = max((r.num_links for g in groups for r in g.runs), default=0)
    stats = ["rounds", "final_acc", *(c for c, _ in extra), "best_acc", "best_round", "final_loss"]
    stats += [f"uplink_bytes_L{n}" for n in range(1, n_links + 1)] + ["uplink_bytes_total", "wall_s", "virtual_s"]
    header = ["run", "n", "status"] + [h for c in stats for h in (c, f"{c}_std")]
    if target is not None:
        header += ["rounds_to_target", "rounds_to_target_min", "rounds_to_target_max", "reached_target",
                   "wall_s_to_target", "virtual_s_to_target", "virtual_s_to_target_min", "virtual_s_to_target_max"]
    header += [*CSV_ONLY, "label"]
    rows = []
    for g in groups:
        per_run: list[dict[str, Any]] = []
        for r in g.runs:
            best, best_round = r.best
            totals = r.link_totals
            v: dict[str, Any] = {"rounds": r.rounds_done, "final_acc": r.final_accuracy, "best_acc": best,
                                 "best_round": best_round, "final_loss": r.final_loss}
            v.update({c: f(r) for c, f in extra})
            v.update({f"uplink_bytes_L{n + 1}": int(totals[n]) if n < r.num_links else None for n in range(n_links)})
            v.update(uplink_bytes_total=int(totals.sum()), wall_s=r.wall_time, virtual_s=r.virtual_time)
            per_run.append(v)
        row: list[Any] = [g.name, g.n, g.status]
        for c in stats:
            row += list(_mean_std([v[c] for v in per_run]))
        if target is not None:
            hits = [h for h in (r.reached(target) for r in g.runs) if h is not None]
            if hits:
                rounds = [h[0] for h in hits]
                virtual = [h[2] for h in hits]
                row += [_median(rounds), min(rounds), max(rounds), f"{len(hits)}/{g.n}",
                        _median([h[1] for h in hits]), _median(virtual), min(virtual), max(virtual)]
            else:
                row += ["", "", "", f"0/{g.n}", "", "", "", ""]
        pseeds = [r.config.get("data.partition.seed") for r in g.runs]
        row += [";".join(_fmt_value(r.config.get("train.seed", "")) for r in g.runs),
                ";".join(_fmt_value(s) for s in pseeds) if any(s is not None for s in pseeds) else "",
                ";".join(str(r.path) for r in g.runs), g.label]
        rows.append(row)
    return header, rows


def _fmt_cell(name: str, v: Any) -> str:
    if v == "" or v is None:
        return "-"
    if name.startswith("uplink_bytes"):
        return f"{v / 1e6:.3f}"
    if name.endswith(("acc", "loss")):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    if name.endswith("_s") or name.endswith("_to_target"):
        return f"{v:.1f}" if isinstance(v, float) and math.isfinite(v) else ("-" if isinstance(v, float) else str(v))
    if isinstance(v, float):  # a mean or std of rounds
        return f"{v:.4g}"
    return str(v)


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """Fixed-width text table; byte columns in MB (10^6 bytes).  A ``<column>_std`` column is shown as
    ``mean±std`` in its column, ``rounds_to_target_min``/``_max`` as ``median [min-max]`` where a group
    has more than one run, and the :data:`CSV_ONLY` columns are left out."""
    at = {h: i for i, h in enumerate(header)}
    merged = {"rounds_to_target_min", "rounds_to_target_max", "virtual_s_to_target_min", "virtual_s_to_target_max",
              *CSV_ONLY}
    cols = [i for i, h in enumerate(header) if not (h in merged or (h.endswith("_std") and h[:-4] in at))]

    def cell(row: list[Any], i: int) -> str:
        h = header[i]
        text = _fmt_cell(h, row[i])
        std = at.get(f"{h}_std")
        if std is not None and row[std] != "" and text != "-":
            text += "±" + _fmt_cell(h, row[std])
        lo, hi = at.get(f"{h}_min"), at.get(f"{h}_max")
        if lo is not None and hi is not None and row[lo] != "" and row[at["n"]] > 1:
            text += f" [{_fmt_cell(h, row[lo])}-{_fmt_cell(h, row[hi])}]"
        return text

    shown = [header[i].replace("uplink_bytes_", "uplink_MB_") for i in cols]
    cells = [[cell(row, i) for i in cols] for row in rows]
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
def curve(runs: Sequence[Run], attr: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(x, mean test accuracy, its sample std or ``None`` for one run) per global round evaluated in some of
    ``runs`` with a finite x (``attr`` names the x values, see :data:`PLOTS`); x is the mean over those runs."""
    per_round: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        x = getattr(r, attr)
        for i in np.flatnonzero(r.evaluated & np.isfinite(x)):
            per_round.setdefault(int(r.rounds[i]), []).append((float(x[i]), float(r.accuracy[i])))
    points = [np.asarray(per_round[k], dtype=np.float64) for k in sorted(per_round)]
    xs = np.array([np.mean(p[:, 0]) for p in points])
    ys = np.array([np.mean(p[:, 1]) for p in points])
    if len(runs) == 1:
        return xs, ys, None
    return xs, ys, np.array([np.std(p[:, 1], ddof=1) if len(p) > 1 else np.nan for p in points])


def _plot(items: Sequence[tuple[str, Sequence[Run]]], out_dir: Path, prefix: str, title: str | None) -> list[Path]:
    """One curve per ``(label, runs)``: the mean over the runs with a ±1 std band (see :func:`curve`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    banded = any(len(runs) > 1 for _, runs in items)
    written = []
    for suffix, (xlabel, attr) in PLOTS.items():
        series = []
        for label, runs in items:
            x, y, sd = curve(runs, attr)
            if x.size:
                series.append((label, x, y, sd))
        if not series:
            continue
        below = max(len(s[0]) for s in series) > 45  # long labels: legend under the axes, wrapped
        texts = [textwrap.fill(s[0], 100, break_long_words=False) if below else s[0] for s in series]
        lines = sum(t.count("\n") + 1 for t in texts)
        fig, ax = plt.subplots(figsize=(7.0, 4.4 + (0.16 * lines + 0.3 if below else 0)), dpi=100)
        many = len(series) > 10  # beyond the default cycle's 10 colours: tab20, and dashes for every other
        for i, (text, (_, x, y, sd)) in enumerate(zip(texts, series)):
            style: dict[str, Any] = ({"color": plt.get_cmap("tab20")(i % 20), "linestyle": ("-", "--")[i % 2]}
                                     if many else {})
            (drawn,) = ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, linewidth=1.4, label=text,
                               **style)
            if sd is not None and np.isfinite(sd).any():
                ax.fill_between(x, y - sd, y + sd, color=drawn.get_color(), alpha=0.2, linewidth=0)
        finals = [s[1][-1] for s in series if s[1][-1] > 0]
        if attr == "uplink_x" and finals and max(finals) / min(finals) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy, mean ± 1 std over seeds" if banded else "test accuracy")
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


def plot_runs(runs: Sequence[Run], out_dir: Path, prefix: str, title: str | None = None) -> list[Path]:
    """Write the PNG plots, one curve per run; returns their paths.  The virtual-time plot is
    drawn only if some run has finite virtual times."""
    return _plot([(r.label, [r]) for r in runs], out_dir, prefix, title)


def plot_groups(groups: Sequence[Group], out_dir: Path, prefix: str, title: str | None = None) -> list[Path]:
    """Write the PNG plots, one mean curve with a ±1 std band per group; returns their paths."""
    return _plot([(g.label, g.runs) for g in groups], out_dir, prefix, title)


# ---- command -----------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="HDF5 result files written by 'qmlhfl-mpi run'")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for the PNG plots (default: the directory of the first file)")
    p.add_argument("--prefix", default=None,
                   help="file name prefix of the plots (default: the file stem for one file, 'report' for several)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table, exact values, as CSV")
    p.add_argument("--target", type=float, default=None, metavar="ACC",
                   help="add the rounds, wall and virtual seconds at which the test accuracy first reached ACC "
                        "(e.g. 0.8); over seeds, the median and the range of the rounds and virtual seconds")
    p.add_argument("--last", type=int, default=None, metavar="K",
                   help="add last<K>_mean_acc: the mean test accuracy over the last K evaluated rounds")
    p.add_argument("--at-time", type=float, default=None, metavar="T",
                   help="add at_<T>s_acc: the test accuracy at a deadline of T seconds of virtual time (the last "
                        "evaluated round that fits)")
    p.add_argument("--title", default=None, help="title of the plots")
    p.add_argument("--label-keys", default=None, metavar="KEY,...",
                   help="label runs by these dotted config keys (default: the keys whose values differ)")
    p.add_argument("--no-plots", action="store_true", help="print the table only")
    p.add_argument("--no-group", action="store_true",
                   help="one row and one curve per file; by default, files whose configs differ only in "
                        "train.seed and data.partition.seed form one row (n, mean±std) and one band")


def main(args: argparse.Namespace) -> int:
    try:
        if args.target is not None and not 0 <= args.target <= 1:
            raise ReportError(f"--target {args.target}: expected an accuracy from 0 to 1, e.g. --target 0.8")
        if args.last is not None and args.last < 1:
            raise ReportError(f"--last {args.last}: expected at least 1 evaluated round, e.g. --last 5")
        if args.at_time is not None and not (math.isfinite(args.at_time) and args.at_time > 0):
            raise ReportError(f"--at-time {args.at_time}: expected a positive number of virtual seconds, "
                              "e.g. --at-time 60")
        runs = [load_run(f) for f in args.files]
        keys = [k.strip() for k in args.label_keys.split(",") if k.strip()] if args.label_keys else None
        groups = [] if args.no_group else group_runs(runs)
        if args.no_group:
            assign_labels(runs, keys)
        else:
            assign_group_labels(groups, keys)
    except ReportError as e:
        print(f"qmlhfl-mpi report: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    extra = extra_columns(args.last, args.at_time)
    header, rows = (table_rows(runs, args.target, extra) if args.no_group
                    else group_rows(groups, args.target, extra))
    print(format_table(header, rows))
    if args.csv:
        try:
            write_csv(Path(args.csv), header, rows)
        except OSError as e:
            print(f"qmlhfl-mpi report: error: cannot write --csv {args.csv!r}: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"table written to {args.csv}")
    if not args.no_plots:
        out = Path(args.out) if args.out else runs[0].path.parent
        prefix = args.prefix or (runs[0].path.stem if len(runs) == 1 else "report")
        try:
            paths = (plot_runs(runs, out, prefix, args.title) if args.no_group
                     else plot_groups(groups, out, prefix, args.title))
        except OSError as e:
            print(f"qmlhfl-mpi report: error: cannot write the plots to {str(out)!r}: {e}", file=sys.stderr)
            return EXIT_USAGE
        for path in paths:
            print(f"plot written to {path}")
        if paths and not any(p.name.endswith("acc_vs_virtual_time.png") for p in paths):
            print("no finite virtual times in these files: virtual-time plot skipped")
        if not paths:
            print("no evaluated rounds in these files: no plots drawn")
    return EXIT_OK
