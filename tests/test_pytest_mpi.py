"""Runs the pytest-mpi suite in tests/mpi under real ``mpiexec`` on 2 and 4 ranks (the 4-rank run also covers
1 to 4 ranks on sub-communicators: tests/mpi/test_engine_matrix.py)."""
import shlex
import sys

import pytest

from helpers import REPO, run_mpi


@pytest.mark.portable
@pytest.mark.parametrize("ranks", [2, 4])
def test_pytest_mpi_suite(ranks, tmp_path):
    # each rank its own --basetemp (pytest cleans its basetemp at start); mpi_tmp_path shares rank 0's
    cmd = (f"exec {shlex.quote(sys.executable)} -m pytest --with-mpi -q -p no:cacheprovider "
           f"--basetemp {shlex.quote(str(tmp_path))}/rank${{PMI_RANK:-$OMPI_COMM_WORLD_RANK}} "  # MPICH, Open MPI
           f"{shlex.quote(str(REPO / 'tests' / 'mpi'))}")
    proc, _ = run_mpi(ranks, ["sh", "-c", cmd], cwd=REPO, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert " passed" in out and " failed" not in out
