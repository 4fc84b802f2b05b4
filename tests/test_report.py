"""`qmlhfl-mpi report` on real result files written by real ``mpiexec`` runs."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import clean_env, small_config
from qmlhfl_mpi import cli
from qmlhfl_mpi.analysis import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEVELS = {"coarse": [3, 8], "float": ["none", 8]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two 3-round runs that differ only in quantizer.levels; evaluated every 2nd round
    (and after the last), so round 0 has a NaN test accuracy."""
    from mpi4py import MPI

    from qmlhfl_mpi import Session, load_config

    tmp = tmp_path_factory.mktemp("report_runs")
    out = {}
    for name, levels in LEVELS.items():
        cfg = small_config(tmp, f"{name}.yaml", quantizer={"levels": levels, "bucket": 16},
                           train={"rounds": 3, "eval_every": 2}, output={"path": str(tmp / f"{name}.h5")})
        assert Session(load_config(str(cfg)), MPI.COMM_SELF).run().status == "completed"
        out[name] = tmp / f"{name}.h5"
    return out


def _metrics(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f["metrics"][k][()] for k in f["metrics"]}


def _capture_legends(monkeypatch) -> dict[str, list[str]]:
    """Record the legend texts of every saved figure, keyed by file name."""
    import matplotlib.figure

    seen: dict[str, list[str]] = {}
    original = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *a, **kw):
        seen[Path(fname).name] = [t.get_text() for t in self.axes[0].get_legend().get_texts()]
        return original(self, fname, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def test_table_csv_legends_and_plots(runs, tmp_path, capsys, monkeypatch):
    legends = _capture_legends(monkeypatch)
    files = [runs["coarse"], runs["float"]]
    out, table_csv = tmp_path / "img", tmp_path / "t.csv"
    rc = cli.main(["report", *map(str, files), "--out", str(out), "--csv", str(table_csv), "--target", "0.0"])
    printed = capsys.readouterr().out
    assert rc == 0

    labels = ["quantizer.levels=[3,8]", "quantizer.levels=[none,8]"]
    with open(table_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["coarse", "float"]
    lines = printed.splitlines()
    for path, row, label in zip(files, rows, labels):
        m = _metrics(path)
        acc = m["test_accuracy"]
        assert np.isnan(acc[0]) and np.isfinite(acc[1:]).all()  # eval_every=2: rounds 1 and 2 (the last)
        per_link = m["uplink_bytes"].sum(axis=0)
        wall = float(np.sum(m["time_round"] + m["time_eval"]))
        assert row["status"] == "completed" and int(row["rounds"]) == len(m["round"]) == 3
        assert float(row["final_acc"]) == acc[-1]
        assert float(row["best_acc"]) == np.nanmax(acc)
        assert int(row["best_round"]) == int(np.nanargmax(acc)) + 1  # rounds counted from 1
        assert [int(row[f"uplink_bytes_L{n}"]) for n in (1, 2)] == per_link.tolist()
        assert int(row["uplink_bytes_total"]) == per_link.sum()
        assert float(row["wall_s"]) == pytest.approx(wall, rel=1e-12)
        assert float(row["virtual_s"]) == m["virtual_time"][-1]
        # no system section: the clock's time is the closed form's, round after round
        assert m["virtual_time"][-1] == pytest.approx(np.sum(m["modelled_time"]), rel=1e-12)
        assert int(row["rounds_to_target"]) == 2  # first evaluation is after round 1
        assert float(row["wall_s_to_target"]) == pytest.approx(np.sum((m["time_round"] + m["time_eval"])[:2]))
        assert float(row["virtual_s_to_target"]) == m["virtual_time"][1]
        assert row["label"] == label
        # the printed line shows the same numbers, bytes in MB
        line = next(ln for ln in lines if ln.startswith(row["run"] + " "))
        assert line.endswith("  " + label)
        cells = line.split()  # grouped by seed (the default): n = 1 run per group, no ± shown
        assert row["n"] == "1" and row["final_acc_std"] == "" and row["seeds"] == "7"
        assert cells[1:7] == ["1", "completed", "3", f"{acc[-1]:.4f}", f"{np.nanmax(acc):.4f}", row["best_round"]]
        assert cells[7] == f"{m['test_loss'][-1]:.4f}" and float(row["final_loss"]) == m["test_loss"][-1]
        assert cells[8:11] == [f"{b / 1e6:.3f}" for b in (*per_link, per_link.sum())]
        assert cells[11] == f"{wall:.1f}"
    # the float32 link 1 carries more bytes than the 3-level one
    assert int(rows[1]["uplink_bytes_L1"]) > int(rows[0]["uplink_bytes_L1"])

    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"report_acc_vs_round.png", "report_acc_vs_uplink.png", "report_acc_vs_walltime.png"} <= names
    assert "report_acc_vs_virtual_time.png" in names
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, p
        assert [t.replace("\n", " ") for t in legends[p.name]] == labels, p
        assert f"plot written to {p}" in printed


def test_single_file_is_labelled_by_its_stem(runs, tmp_path, capsys):
    rc = cli.main(["report", str(runs["coarse"]), "--out", str(tmp_path), "--no-plots"])
    printed = capsys.readouterr().out
    assert rc == 0
    line = printed.splitlines()[2]
    assert line.startswith("coarse ") and line.endswith(" coarse")  # name and label
    assert not list(tmp_path.glob("*.png"))


def test_plots_default_next_to_the_file_with_its_stem(runs, tmp_path, capsys):
    copy = tmp_path / "one_run.h5"
    copy.write_bytes(runs["float"].read_bytes())
    assert cli.main(["report", str(copy)]) == 0
    capsys.readouterr()
    assert (tmp_path / "one_run_acc_vs_round.png").read_bytes()[:8] == PNG_MAGIC


def test_run_stopped_before_its_first_round(runs, tmp_path, capsys):
    """A file with the config but no rounds (a job that failed early) still reports."""
    from qmlhfl_mpi.results import ResultsWriter

    with h5py.File(runs["coarse"], "r") as f:
        attrs = {"config_yaml": f.attrs["config_yaml"], "N": 2}
    w = ResultsWriter(tmp_path / "empty.h5", overwrite=False, attrs=attrs, topology={}, quantizer={}, num_links=2)
    w.close("failed", "RuntimeError: boom")
    rc = cli.main(["report", str(tmp_path / "empty.h5"), str(runs["coarse"]), "--out", str(tmp_path), "--no-group"])
    printed = capsys.readouterr().out
    assert rc == 0
    empty = next(ln for ln in printed.splitlines() if ln.startswith("empty "))
    assert empty.split()[1:5] == ["failed", "0", "nan", "nan"]
    assert (tmp_path / "report_acc_vs_round.png").stat().st_size > 0
    # grouped (the default): the same config, so one group of 2 with both statuses
    rc = cli.main(["report", str(tmp_path / "empty.h5"), str(runs["coarse"]), "--out", str(tmp_path)])
    group = capsys.readouterr().out.splitlines()[2].split()
    assert rc == 0 and group[1:4] == ["2", "failed:1,completed:1", "1.5±2.121"], group


def test_labels_from_differing_keys_ignore_output_path():
    cfgs = [report.flatten({"tau": [2, 2], "train": {"lr": 0.1, "seed": 1}, "output": {"path": "a.h5"}}),
            report.flatten({"tau": [2, 2], "train": {"lr": 0.2, "seed": 1}, "output": {"path": "b.h5"}})]
    assert cfgs[0] == {"tau": [2, 2], "train.lr": 0.1, "train.seed": 1, "output.path": "a.h5"}
    assert report.differing_keys(cfgs) == ["train.lr"]
    assert report.differing_keys([cfgs[0], {**cfgs[0], "extra.key": 1}]) == ["extra.key"]


def test_errors_name_the_file(runs, tmp_path, capsys):
    missing = tmp_path / "nope.h5"
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=[1, 2])
    for bad, why in ((missing, "not found"), (text, "not an HDF5 file"), (foreign, "not a qmlhfl-mpi results file"),
                     (tmp_path, "is a directory")):
        assert cli.main(["report", str(runs["coarse"]), str(bad), "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert f"qmlhfl-mpi report: error: '{bad}'" in err or f"results file '{bad}' not found" in err, err
        assert why in err, err
    assert cli.main(["report", str(runs["coarse"]), "--label-keys", "train.nope"]) == 2
    assert "train.nope" in capsys.readouterr().err
    # the installed command line: exit status 2 and one message, no traceback
    proc = subprocess.run([sys.executable, "-m", "qmlhfl_mpi", "report", str(missing)],
                          capture_output=True, text=True, env=clean_env(), timeout=60)
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
