"""Seeds as an axis: ``data.partition.seed``, ``report`` grouped by seed, and ``qmlhfl-mpi sweep``.

Every run here is a real ``mpiexec`` job on the small test config."""
from __future__ import annotations

import csv
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import clean_env, small_config
from qmlhfl_mpi import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1)  # two seeds are enough to group by seed (each run is a process start: a few seconds)
LEVELS = {"coarse": [3, 8], "float": ["none", 8]}

BLOBS = textwrap.dedent("""
    import numpy as np

    def blobs(root, train, n=240, classes=4, dim=6):
        g = np.random.default_rng(0 if train else 1)
        y = g.integers(0, classes, n)
        x = g.standard_normal((n, dim)) + 2.0 * np.eye(classes, dim)[y]
        return x.astype(np.float32), y.astype(np.int64)
""")


def _read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {"samples": f["topology/samples"][()], "class_counts": f["topology/class_counts"][()],
                "final": f["model/final"][()], "acc": f["metrics/test_accuracy"][()]}


def _parallel(cmds: list[list[str]], cwd: Path, width: int = 4) -> list[tuple[int, str]]:
    """Run the commands, ``width`` at a time; (exit status, stdout + stderr) of each, in order."""
    results: list[tuple[int, str]] = []
    for i in range(0, len(cmds), width):
        procs = [subprocess.Popen(c, cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for c in cmds[i:i + width]]
        for p in procs:
            out, _ = p.communicate(timeout=300)
            results.append((p.returncode, out))
    return results


def _run_all(tmp: Path, runs: list[tuple[str, dict]]) -> list[dict[str, np.ndarray]]:
    """Run the small config with each (name, sections) in this process; the results of each.  (The split and the
    training do not depend on the rank count: tests/mpi/test_engine_matrix.py.)"""
    from mpi4py import MPI

    from qmlhfl_mpi import Session, load_config

    for name, sections in runs:
        cfg = small_config(tmp, f"{name}.yaml", output={"path": str(tmp / f"{name}.h5")}, **sections)
        assert Session(load_config(str(cfg)), MPI.COMM_SELF).run().status == "completed", name
    return [_read(tmp / f"{name}.h5") for name, _ in runs]


def test_partition_seed_fixes_the_split_and_train_seed_varies_the_training(tmp_path):
    (tmp_path / "blobs.py").write_text(BLOBS)

    def pooled(name: str, seed: int, pseed: int | None) -> tuple[str, dict]:
        data = {"name": f"{blobs}:blobs", "partition": {"kind": "dirichlet", "alpha": 0.3, "seed": pseed}}
        return name, {"data": data, "model": {"name": "logreg", "args": {}}, "train": {"seed": seed}}

    def synthetic(name: str, seed: int, pseed: int) -> tuple[str, dict]:
        return name, {"data": {"partition": {"seed": pseed}}, "train": {"seed": seed}}

    blobs = tmp_path / "blobs.py"
    a, b, c, d, e, f, g = _run_all(tmp_path, [
        pooled("a", seed=1, pseed=3),
        pooled("b", seed=2, pseed=3),     # same split, other training noise
        pooled("c", seed=1, pseed=4),     # other split
        pooled("d", seed=1, pseed=None),  # the default: the split follows train.seed ...
        pooled("e", seed=1, pseed=1),     # ... i.e. the same as data.partition.seed = train.seed, bit for bit
        synthetic("f", seed=1, pseed=5),
        synthetic("g", seed=2, pseed=5),
    ])
    assert np.array_equal(a["samples"], b["samples"]) and np.array_equal(a["class_counts"], b["class_counts"])
    assert not np.array_equal(a["final"], b["final"])
    assert not np.array_equal(a["class_counts"], c["class_counts"])
    assert not np.array_equal(a["final"], c["final"])
    for key in ("samples", "class_counts", "final", "acc"):
        assert np.array_equal(d[key], e[key], equal_nan=True), key
    assert not np.array_equal(d["class_counts"], a["class_counts"])

    # generated data (synthetic): the partition seed generates the data, train.seed only the training
    assert np.array_equal(f["samples"], g["samples"]) and np.array_equal(f["class_counts"], g["class_counts"])
    assert not np.array_equal(f["final"], g["final"])


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, list[Path]]:
    """Two configs (quantizer levels) x 2 seeds, each config run by one real ``sweep`` (1 rank)."""
    tmp = tmp_path_factory.mktemp("seed_sweeps")
    out: dict[str, list[Path]] = {}
    cmds = []
    for name, levels in LEVELS.items():
        cfg = small_config(tmp, f"{name}.yaml", quantizer={"levels": levels, "bucket": 16},
                           train={"rounds": 3, "eval_every": 2})
        cmds.append([sys.executable, "-m", "qmlhfl_mpi", "sweep", str(cfg), "--seeds", *map(str, SEEDS),
                     "--out-dir", "res", "--target", "0.0"])
    for name, (rc, printed) in zip(LEVELS, _parallel(cmds, tmp)):  # the two sweeps side by side
        assert rc == 0, printed
        out[name] = [tmp / "res" / f"{name}-seed{s}.h5" for s in SEEDS]
        assert all(p.is_file() for p in out[name])
        # the sweep's own report: one group of 2 runs, its CSV and plots
        with open(tmp / "res" / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1 and rows[0]["n"] == "2" and rows[0]["run"] == name, rows
        assert rows[0]["seeds"] == "0;1" and rows[0]["reached_target"] == "2/2"
        assert (tmp / "res" / f"{name}_acc_vs_round.png").read_bytes()[:8] == PNG_MAGIC
        assert "sweep: run 2/2: " in printed and "table written to" in printed
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_groups_runs_by_seed(sweeps, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    bands: dict[str, int] = {}
    original = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *a, **kw):
        bands[Path(fname).name] = len(self.axes[0].collections)  # one fill_between per group
        return original(self, fname, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    files = [str(p) for name in LEVELS for p in sweeps[name]]
    rc = cli.main(["report", *files, "--out", str(tmp_path / "img"), "--csv", str(tmp_path / "g.csv"),
                   "--target", "0.0"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert cli.main(["report", *files, "--no-group", "--no-plots", "--csv", str(tmp_path / "r.csv"),
                     "--target", "0.0"]) == 0
    capsys.readouterr()
    groups, runs = _csv(tmp_path / "g.csv"), _csv(tmp_path / "r.csv")
    assert len(groups) == 2 and len(runs) == 4
    assert [g["run"] for g in groups] == ["coarse", "float"] and [g["n"] for g in groups] == ["2", "2"]
    assert [g["label"] for g in groups] == ["quantizer.levels=[3,8]", "quantizer.levels=[none,8]"]
    for k, g in enumerate(groups):
        per_run = runs[2 * k:2 * k + 2]
        assert [Path(r["run"]).name for r in per_run] == [f"{g['run']}-seed{s}" for s in SEEDS]
        for col in ("final_acc", "best_acc", "final_loss", "uplink_bytes_L1", "uplink_bytes_total", "wall_s"):
            vals = np.array([float(r[col]) for r in per_run])
            assert float(g[col]) == np.mean(vals), col
            assert float(g[col + "_std"]) == np.std(vals, ddof=1), col
        # the runs' own files agree with the per-run rows
        finals = [_read(Path(p))["acc"][-1] for p in files[2 * k:2 * k + 2]]
        assert float(g["final_acc"]) == np.mean(finals)
        rounds = [int(r["rounds_to_target"]) for r in per_run]
        assert (int(g["rounds_to_target"]), int(g["rounds_to_target_min"]), int(g["rounds_to_target_max"])) == (
            int(np.median(rounds)), min(rounds), max(rounds))
        assert g["reached_target"] == "2/2"
        virtual = [float(r["virtual_s_to_target"]) for r in per_run]  # the clock's seconds: median and range
        assert (float(g["virtual_s_to_target"]), float(g["virtual_s_to_target_min"]),
                float(g["virtual_s_to_target_max"])) == (float(np.median(virtual)), min(virtual), max(virtual))
        # the table shows mean±std and n
        line = next(ln for ln in printed.splitlines() if ln.startswith(g["run"] + " "))
        cells = line.split()
        assert cells[1] == "2" and cells[4] == f"{float(g['final_acc']):.4f}±{float(g['final_acc_std']):.4f}"
        assert line.endswith("  " + g["label"])
    pngs = sorted((tmp_path / "img").glob("*.png"))
    assert {"report_acc_vs_round.png", "report_acc_vs_uplink.png", "report_acc_vs_walltime.png"} <= {
        p.name for p in pngs}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, p
        assert bands[p.name] == 2, p


def test_sweep_dry_run_prints_the_commands(tmp_path, capsys):
    cfg = small_config(tmp_path)
    out = tmp_path / "sw"
    rc = cli.main(["sweep", str(cfg), "--seeds", "4", "9", "--partition-seeds", "2", "--ranks", "2",
                   "--set", "train.lr=0.2", "--out-dir", str(out), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(lines) == 3 and not out.exists()
    for line, s in zip(lines, (4, 9)):
        words = shlex.split(line)
        assert words[1:3] == ["-n", "2"] and words[3:7] == [sys.executable, "-m", "qmlhfl_mpi", "run"]
        assert words[7] == str(cfg)
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        assert sets == ["train.lr=0.2", f"train.seed={s}", "data.partition.seed=2",
                        f"output.path={out}/cfg-seed{s}-pseed2.h5"]
    assert shlex.split(lines[2])[:4] == ["qmlhfl-mpi", "report", f"{out}/cfg-seed4-pseed2.h5",
                                         f"{out}/cfg-seed9-pseed2.h5"]


def test_sweep_file_for_jobs_sweep_sbatch(tmp_path, capsys):
    cfg = small_config(tmp_path)
    sweep_file = tmp_path / "seeds.txt"
    args = ["sweep", str(cfg), "--seeds", "0", "1", "2", "--set", "quantizer.levels=[2,none]",
            "--out-dir", "results/s", "--emit-sweep-file", str(sweep_file)]
    assert cli.main(args) == 0
    assert f"sbatch --array=0-2 jobs/sweep.sbatch {sweep_file}" in capsys.readouterr().out
    lines = [ln for ln in sweep_file.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == [f"{cfg} --set quantizer.levels=[2,none] --set train.seed={s} "
                     f"--set output.path=results/s/cfg-seed{s}.h5" for s in (0, 1, 2)]
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err  # never replaced silently
    assert cli.main(["sweep", str(cfg), "--seeds", "0", "--set", "train.lr=0.1 ", "--out-dir", "a b",
                     "--emit-sweep-file", str(tmp_path / "x.txt")]) == 2
    assert "holds a blank" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1", "1"], "given more than once"),
    (["--seeds", "0", "--set", "train.seed=3"], "give it with --seeds"),
    (["--seeds", "0", "--set", "output.path=x.h5"], "--out-dir"),
    (["--seeds", "0", "--set", "data.partition.seed=3"], "--partition-seeds"),
    (["--seeds", "0", "--set", "train.lr=-1"], "train.lr"),
    (["--seeds", "0", "--ranks", "0"], "--ranks 0"),
])
def test_sweep_errors_quote_the_value_and_the_fix(tmp_path, capsys, extra, message):
    cfg = small_config(tmp_path)
    assert cli.main(["sweep", str(cfg), *extra, "--out-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qmlhfl-mpi sweep: error: ") and message in err, err


def test_sweep_refuses_existing_results(sweeps, capsys):
    existing = sweeps["coarse"][0]
    cfg = existing.parent.parent / "coarse.yaml"
    rc = cli.main(["sweep", str(cfg), "--seeds", "0", "--out-dir", str(existing.parent)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
