"""Runs the pytest-mpi suite in tests/mpi under real ``mpiexec`` at several sizes."""
import sys

import pytest
from helpers import REPO, run_mpi


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_pytest_mpi_suite(ranks, tmp_path):
    proc, _ = run_mpi(ranks, [sys.executable, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider",
                              "--basetemp", str(tmp_path / "base"), str(REPO / "tests" / "mpi")],
                      cwd=REPO, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert " passed" in out and " failed" not in out
