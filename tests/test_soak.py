"""The soak benchmark's smoke run: SIGTERM on 1 rank and --resume on 3 ends bit for bit like one
uninterrupted run on 2 ranks (no timing is asserted)."""
from __future__ import annotations

from helpers import bench


def test_soak_smoke_is_identical_after_a_restart_on_another_rank_count():
    out = bench("benchmarks/soak.py", "--smoke", timeout=240)
    lines = out.splitlines()
    assert lines[-1] == "identical: True", out
    restarts = int(next(ln for ln in lines if ln.startswith("restarts:")).split()[1])
    assert restarts >= 1, out
    assert "model/final" in out and "metrics/train_loss" in out
    assert all(ln.endswith("identical: True") for ln in lines if "identical:" in ln), out
