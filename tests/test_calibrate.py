"""`optimize --calibrate` (analysis/calibrate.py, docs/theory.md section 16)."""
from __future__ import annotations

import math
import re

import pytest

from helpers import small_config
from qmlhfl_mpi import load_config
from qmlhfl_mpi.analysis import calibrate as cal
from qmlhfl_mpi.cli import main
from qmlhfl_mpi.config import build as builders
from qmlhfl_mpi.core.theory import q_per_link, round_time
from qmlhfl_mpi.core.topology import Tree


def _model(G0: float = 5.0) -> cal.BoundModel:
    return cal.BoundModel(L=5.0, lr=0.1, qs=(0.5, 0.05), tree=Tree.uniform([2, 3]), G0=G0, sigma2=1.0, zeta2=0.5)


@pytest.mark.parametrize("c_true", [0.01, 0.03])
def test_fit_recovers_a_known_scale(c_true):
    m = _model()
    taus = [(4, 1), (2, 2), (1, 4), (3, 3)]
    rts = [0.05 * math.prod(t) + 0.02 * t[1] + 0.1 for t in taus]
    c_max = m.c_max(taus)
    assert c_true < c_max
    measured = [m.rate(t, rt, c_true) for t, rt in zip(taus, rts)]
    assert all(v > 0 for v in measured)
    c, sse = cal.fit_scale(measured, lambda i, c: m.rate(taus[i], rts[i], c), c_max)
    assert c == pytest.approx(c_true, rel=0.05)
    assert sse < 1e-6


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="no pilot"):
        cal.fit_scale([], lambda i, c: 1.0, 1.0)
    with pytest.raises(ValueError, match="measured=.*> 0"):
        cal.fit_scale([-1.0], lambda i, c: 1.0, 1.0)


def test_default_pilot_taus_split_the_same_K():
    assert cal.default_pilot_taus((2, 2), 50) == [(4, 1), (2, 2), (1, 4)]
    assert cal.default_pilot_taus((5, 2, 2), 10) == [(10, 2, 1), (5, 2, 2), (1, 2, 10)]
    assert all(math.prod(t) == 20 for t in cal.default_pilot_taus((5, 2, 2), 10))


def test_optimize_calibrate_writes_a_feasible_tau_and_the_scale(tmp_path, capsys):
    cfg_path = small_config(tmp_path)
    out = tmp_path / "out.yaml"
    deadline = 5.0
    rc = main(["optimize", str(cfg_path), "--calibrate", "--deadline", str(deadline), "--max-tau", "8",
               "--random", "20", "--write", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    m = re.search(r"fitted scale c = ([0-9.eE+-]+)", text)
    assert m, text
    c = float(m.group(1))
    assert c > 0
    assert text.count("pilot tau = ") == 3 and "measured" in text and "predicted" in text
    written = out.read_text()
    head = [ln for ln in written.splitlines() if ln.startswith("# calibrated scale c = ")]
    assert len(head) == 1 and float(head[0].split()[5]) == pytest.approx(c, rel=1e-5)
    new = load_config(str(out))
    tree = new.build_tree()
    rt = round_time(builders.model_dim(new), new.tau, builders.codecs(new), tree, builders.latency(new))
    assert all(1 <= t <= 8 for t in new.tau)
    assert math.floor(deadline / rt) >= 1
    assert q_per_link(builders.model_dim(new), builders.codecs(new))  # the written config is usable


def test_calibrate_refuses_a_different_lr(tmp_path, capsys):
    rc = main(["optimize", str(small_config(tmp_path)), "--calibrate", "--deadline", "5", "--lr", "0.01"])
    assert rc == 2
    assert "--set train.lr=0.01" in capsys.readouterr().err
