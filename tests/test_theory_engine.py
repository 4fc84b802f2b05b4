"""The learning-rate condition of docs/theory.md against the real engine.

An L-smooth problem: ``data.name: lstsq`` with ``model.name: linear``, loss
``0.5 mean((x.w + b - y)^2)`` per device.  Its smoothness constant is computed
exactly from the devices' training data (largest eigenvalue of
``X_k^T X_k / n_k`` with a ones column for the bias, maximised over devices),
so ``theory.max_lr`` is the bound itself, not an estimate.  Then the engine runs
under ``mpiexec -n 2``: a step inside the bound converges, a step far outside it
diverges, and the ``check`` / ``optimize`` commands report the same numbers.
"""
from __future__ import annotations

import math
import re

import h5py
import numpy as np
import pytest

from helpers import run_cli, small_config
from qmlhfl_mpi import config
from qmlhfl_mpi.cli import main as cli_main
from qmlhfl_mpi.config import build
from qmlhfl_mpi.core.codecs import link_codecs
from qmlhfl_mpi.core.exitcodes import EXIT_LR_VIOLATED
from qmlhfl_mpi.core.theory import (
    LatencyModel,
    lr_condition_B,
    max_lr,
    q_per_link,
    round_time,
)

pytestmark = pytest.mark.slow

DIM = 8  # features; the linear model has DIM + 1 parameters (bias)
LSTSQ = {
    "topology": {"branching": [2, 3]},
    "tau": [3, 2],
    "quantizer": {"levels": [4, 16], "bucket": 16},
    "train": {"lr": 0.01, "batch_size": 8, "rounds": 15, "seed": 7, "eval_every": 1},
    "data": {"name": "lstsq", "synthetic": {"dim": DIM, "samples": 60}},
    "model": {"name": "linear", "args": {}},  # replaces the small config's mlp args
    "latency": {"step_time": 0.01, "uplink_rate": [2000.0, 500.0], "uplink_latency": [0.01, 0.1]},
}


def exact_smoothness(cfg: config.Config) -> float:
    """``max_k lambda_max(X_k^T X_k / n_k)`` (bias column included): the exact
    smoothness constant of every device's least-squares loss."""
    tree = cfg.build_tree()
    data = build.local_data(cfg, tree, range(tree.num_devices), 0, 1)
    best = 0.0
    for x, y in data.train.values():
        X = np.hstack([x.numpy().astype(np.float64), np.ones((len(y), 1))])
        best = max(best, float(np.linalg.eigvalsh(X.T @ X / len(y))[-1]))
    return best


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lstsq")
    path = small_config(tmp, **LSTSQ)
    cfg = config.load(path)
    tree = cfg.build_tree()
    L = exact_smoothness(cfg)
    qs = q_per_link(DIM + 1, link_codecs(cfg.quantizer.levels, cfg.quantizer.bucket))
    bound = max_lr(L, cfg.tau, qs, tree)
    return {"path": path, "cfg": cfg, "tree": tree, "L": L, "qs": qs, "bound": bound, "tmp": tmp}


def _run(problem, name: str, lr: float, rounds: int):
    out = problem["tmp"] / f"{name}.h5"
    proc, _ = run_cli(2, ["run", str(problem["path"]), "--quiet", "--set", f"train.lr={lr!r}",
                          "--set", f"train.rounds={rounds}", "--set", f"output.path={out}"], timeout=300)
    with h5py.File(out) as f:
        return proc, f.attrs["status"], f["metrics/train_loss"][()], f["metrics/test_loss"][()]


def test_lr_inside_the_bound_converges_in_the_engine(problem):
    lr = 0.9 * problem["bound"]
    proc, status, train, test = _run(problem, "inside", lr, 15)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert status == "completed"
    assert np.isfinite(train).all() and np.isfinite(test).all()
    assert train[-1] < train[0], train
    assert test[-1] < test[0], test


def test_lr_far_above_the_bound_diverges_in_the_engine(problem):
    lr = 3.0 / problem["L"]
    assert lr > 10 * problem["bound"]  # "well above": the bound is about L lr < 0.13 here
    proc, status, train, _ = _run(problem, "above", lr, 300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "diverged" in proc.stderr
    assert status == "diverged"
    assert len(train) < 300 and not np.isfinite(train[-1])


def _cli(args, capsys):
    rc = cli_main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_check_prints_the_exact_bound_and_strict_exit_codes(problem, capsys):
    p, L, bound = str(problem["path"]), problem["L"], problem["bound"]
    B = lr_condition_B(problem["cfg"].tau, problem["qs"], problem["tree"])
    rc, out, err = _cli(["check", p, "--L", repr(L), "--strict", "--set", f"train.lr={0.99 * bound!r}"], capsys)
    assert f"{DIM + 1} parameters" in out
    assert f"with B = {B:.4g}: admissible lr < {bound:.4g}" in out, out
    assert "satisfies the condition" in out
    assert rc == 0, err
    rc, out, err = _cli(["check", p, "--L", repr(L), "--strict", "--set", f"train.lr={1.01 * bound!r}"], capsys)
    assert f"admissible lr < {bound:.4g}" in out
    assert "VIOLATES the condition" in out
    assert rc == EXIT_LR_VIOLATED
    rc, out, err = _cli(["check", p, "--L", repr(L), "--set", f"train.lr={1.01 * bound!r}"], capsys)
    assert rc == 0  # without --strict a violation is only reported
    rc, out, err = _cli(["check", p], capsys)  # the Hessian estimate is exact for a quadratic loss
    assert rc == 0 and f"L = {L:.4g} (ESTIMATE" in out, out


def test_optimize_writes_a_feasible_config_that_fits_the_deadline(problem, capsys):
    cfg, tree, L = problem["cfg"], problem["tree"], problem["L"]
    lr = 0.2 * max_lr(L, [1, 1], problem["qs"], tree)
    deadline, max_tau = 10.0, 12
    out = problem["tmp"] / "optimised.yaml"
    rc, text, err = _cli(["optimize", str(problem["path"]), "--deadline", repr(deadline), "--L", repr(L),
                          "--lr", repr(lr), "--max-tau", str(max_tau), "--random", "50", "--write", str(out)],
                         capsys)
    assert rc == 0, err
    new = config.load(out)
    assert all(1 <= t <= max_tau for t in new.tau) and len(new.tau) == tree.N
    assert new.train.lr == lr
    lat = LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())
    rt = round_time(DIM + 1, new.tau, link_codecs(new.quantizer.levels, new.quantizer.bucket), tree, lat)
    T = math.floor(deadline / rt)
    assert T >= 1 and T * rt <= deadline
    assert lr < max_lr(L, new.tau, problem["qs"], tree)
    m = re.search(r"optimum tau = \[([\d, ]+)\].*T = (\d+) rounds of ([\d.eE+-]+) s", text)
    assert m, text
    assert [int(v) for v in m.group(1).split(",")] == list(new.tau)
    assert int(m.group(2)) == T and float(m.group(3)) == pytest.approx(rt, rel=1e-3)
    assert math.prod(new.tau) > 1  # the deadline leaves room for local steps: not the trivial tau
