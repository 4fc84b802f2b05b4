"""The soak benchmark's smoke run: SIGTERM / --resume on 1, 2 and 3 ranks ends bit for bit
like one uninterrupted run on 4 ranks (no timing is asserted)."""
from __future__ import annotations

from helpers import bench


def test_soak_smoke_is_identical_after_two_restarts():
    out = bench("benchmarks/soak.py", "--smoke", timeout=240)
    lines = out.splitlines()
    assert lines[-1] == "identical: True", out
    restarts = int(next(ln for ln in lines if ln.startswith("restarts:")).split()[1])
    assert restarts >= 2, out
    assert "model/final" in out and "metrics/train_loss" in out
    assert all(ln.endswith("identical: True") for ln in lines if "identical:" in ln), out
