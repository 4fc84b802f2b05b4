"""``qmlhfl-mpi sweep --file``: a study as one command (a sweep file, runs side by side, then the report),
``--continue`` to run it in pieces, and the report's ``--last`` / ``--at-time`` columns.

The runs are real ``mpiexec`` jobs of the small test config; the numbers are checked against a direct
numpy computation on the HDF5 files they wrote."""
from __future__ import annotations

import csv
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import clean_env, small_config
from qmlhfl_mpi import cli

SEEDS = (0, 1)  # two seeds are enough to group by seed (each run is a process start: a few seconds)


def _sweep(tmp: Path, *args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "qmlhfl_mpi", "sweep", *args], cwd=tmp, env=clean_env(),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def _write_sweep(tmp: Path, cfg: Path, report: str) -> Path:
    lines = ["# a study: two quantizer settings x 2 seeds", f"# report: {report}"]
    for name, levels in (("coarse", "[2,none]"), ("fine", "[16,none]")):
        for s in SEEDS:
            lines.append(f"{cfg.name} --set quantizer.levels={levels} --set train.seed={s} "
                         f"--set output.path=res/{name}-seed{s}.h5")
    path = tmp / "study.txt"
    path.write_text("\n".join(lines) + "\n\n")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep_file")
    cfg = small_config(tmp, "base.yaml", quantizer={"levels": [4, "none"], "bucket": 16},
                       train={"rounds": 4, "eval_every": 1})
    sweep = _write_sweep(tmp, cfg, "--out img --prefix study --last 2 --at-time 1e9 --no-plots")
    rc, out = _sweep(tmp, "--file", sweep.name, "--jobs", "2", "--out-dir", "rep")
    assert rc == 0, out
    assert out.count("done: res/") == 4 and "sweep: qmlhfl-mpi report" in out, out
    return tmp


def _final_acc(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["metrics/test_accuracy"][()]


def test_a_sweep_file_runs_side_by_side_and_reports_grouped_by_seed(study):
    for name in ("coarse", "fine"):
        for s in SEEDS:
            h5 = study / "res" / f"{name}-seed{s}.h5"
            assert h5.is_file() and (study / "res" / f"{name}-seed{s}.h5.log").is_file()  # --jobs 2: a log per run
    with open(study / "rep" / "study.csv", newline="") as f:   # the '# report:' --csv default: DIR/NAME.csv
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"coarse", "fine"}
    for name, row in rows.items():
        accs = [_final_acc(study / "res" / f"{name}-seed{s}.h5") for s in SEEDS]
        assert row["n"] == "2" and row["seeds"] == "0;1"
        final = np.array([a[-1] for a in accs])
        assert float(row["final_acc"]) == pytest.approx(final.mean(), rel=1e-12)
        assert float(row["final_acc_std"]) == pytest.approx(final.std(ddof=1), rel=1e-9)
        last2 = np.array([a[-2:].mean() for a in accs])           # --last 2 from the '# report:' line
        assert float(row["last2_mean_acc"]) == pytest.approx(last2.mean(), rel=1e-12)
        assert float(row["at_1e+09s_acc"]) == pytest.approx(final.mean(), rel=1e-12)  # a deadline past the end
    assert not (study / "img").exists()  # --no-plots from the '# report:' line


def test_continue_skips_complete_runs_and_completes_the_rest(study):
    keep = study / "res" / "coarse-seed1.h5"
    before = keep.stat().st_mtime_ns
    lost = study / "res" / "fine-seed1.h5"
    lost.unlink()
    rc, out = _sweep(study, "--file", "study.txt", "--out-dir", "rep")   # without --continue: refused
    assert rc == 2 and "--continue" in out and keep.stat().st_mtime_ns == before
    rc, out = _sweep(study, "--file", "study.txt", "--continue", "--out-dir", "rep")
    assert rc == 0, out
    assert out.count("is finished (completed), skipped") == 3 and lost.is_file()
    assert keep.stat().st_mtime_ns == before
    assert _final_acc(lost).shape == (4,)


@pytest.mark.parametrize("status, resumed", [("running", True), ("preempted", True), ("failed", True),
                                             ("diverged", False), ("completed", False)])
def test_continue_resumes_unfinished_results_and_keeps_finished_ones(study, tmp_path, capsys, status, resumed):
    part = tmp_path / "part.h5"
    shutil.copy(study / "res" / "coarse-seed0.h5", part)
    with h5py.File(part, "r+") as f:   # 'running' stands in for a run killed mid-way
        f.attrs["status"] = status
    lines = (study / "study.txt").read_text().splitlines()
    line = next(ln for ln in lines if "coarse-seed0" in ln).replace("res/coarse-seed0.h5", str(part))
    line = line.replace("base.yaml", str(study / "base.yaml"))
    (tmp_path / "one.txt").write_text(line + "\n")
    assert cli.main(["sweep", "--file", str(tmp_path / "one.txt"), "--continue", "--dry-run"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    if resumed:
        assert shlex.split(first)[-2:] == ["--quiet", "--resume"]
    else:
        assert first.endswith(f"is finished ({status}), skipped")


@pytest.mark.parametrize("line, message", [
    ("{cfg} --overwrite", "--set KEY=VALUE options only"),
    ("missing.yaml --set train.lr=0.1", "config 'missing.yaml' not found"),
    ("{cfg} --set train.lr=-1", "train.lr"),
    ("{cfg}\n{cfg}", "is also the output of line 1"),
    ("# report: --bogus\n{cfg}", "'# report:' line"),
    ("# nothing here", "holds no runs"),
])
def test_bad_sweep_files_fail_before_any_run(tmp_path, capsys, line, message):
    cfg = small_config(tmp_path)
    path = tmp_path / "bad.txt"
    path.write_text(line.format(cfg=cfg) + "\n")
    assert cli.main(["sweep", "--file", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qmlhfl-mpi sweep: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--file", "{f}", "--seeds", "0"], "give no CONFIG, --seeds"),
    (["--file", "{f}", "--jobs", "0"], "--jobs 0"),
    (["--file", "{f}", "--continue", "--overwrite"], "give one of them"),
    (["{cfg}", "--out-dir", "x"], "--seeds: give"),
    (["{cfg}", "--seeds", "0"], "--out-dir: give"),
    ([], "give a CONFIG with --seeds"),
])
def test_sweep_argument_errors(tmp_path, capsys, args, message):
    cfg = small_config(tmp_path)
    f = tmp_path / "s.txt"
    f.write_text(f"{cfg}\n")
    argv = [a.format(f=f, cfg=cfg) for a in args]
    assert cli.main(["sweep", *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qmlhfl-mpi sweep: error: ") and message in err, err


def test_the_committed_study_files_are_valid(capsys):
    """Every sweep file in studies/ loads (configs, overrides, report options) and names distinct outputs."""
    repo = Path(__file__).resolve().parents[1]
    files = sorted((repo / "studies").glob("*.txt"))
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("the studies use Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    assert len(files) >= 6
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        for f in files:
            assert cli.main(["sweep", "--file", str(f.relative_to(repo)), "--dry-run"]) == 0, f
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert out.count("qmlhfl-mpi report") == len(files)
