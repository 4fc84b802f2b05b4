"""The layering rules hold, and the linter that enforces them in CI can fail."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

SRC = REPO / "src" / "qmlhfl_mpi"


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail("lint-imports not found beside this Python: pip install -e '.[test]' brings import-linter")
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    proc = lint_imports(REPO, REPO / "src")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("core/topology.py", "import h5py", "The pure core imports neither mpi4py, h5py nor torch"),
    ("learning/models.py", "from mpi4py import MPI", "Only the communication layer"),
    ("run/runtime.py", "from mpi4py import MPI", "Only the communication layer"),  # all of run, by pattern
    ("data/local.py", "from ..config import Config", "Layers"),
    ("run/console.py", "import h5py", "Only results I/O imports h5py"),
])
def test_a_forbidden_import_breaks_the_linter(tmp_path, module, line, contract):
    shutil.copytree(SRC, tmp_path / "src" / "qmlhfl_mpi", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "qmlhfl_mpi" / module
    text = target.read_text()
    target.write_text(text.replace("from __future__ import annotations\n",
                                   f"from __future__ import annotations\n\n{line}\n", 1))
    proc = lint_imports(tmp_path, tmp_path / "src")
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout and contract in proc.stdout.replace("\n", " "), proc.stdout


def test_only_the_entry_points_touch_comm_world():
    allowed = {SRC / "cli.py", SRC / "run" / "session.py"}
    offenders = [str(p.relative_to(REPO)) for p in SRC.rglob("*.py")
                 if "COMM_WORLD" in re.sub(r'""".*?"""', "", p.read_text(), flags=re.S) and p not in allowed]
    assert not offenders, f"COMM_WORLD outside the entry points: {offenders}"


def test_no_test_hooks_left_in_the_library():
    text = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    for hook in ("QMLHFL_FAULT", "QMLHFL_ROUND_DELAY", "crash_hook"):
        assert hook not in text, hook


def test_importing_the_package_initialises_neither_mpi_nor_torch():
    code = ("import sys, qmlhfl_mpi, qmlhfl_mpi.config; "
            "bad = [m for m in ('mpi4py.MPI', 'torch', 'h5py') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_no_dead_code_beyond_the_justified_names():
    """vulture finds nothing unused in the library except the names tests/vulture_whitelist.py justifies."""
    exe = Path(sys.executable).with_name("vulture")
    if not exe.exists():
        pytest.fail("vulture not found beside this Python: pip install -e '.[test]' brings it")
    proc = subprocess.run([str(exe), "src/qmlhfl_mpi", "tests/vulture_whitelist.py", "--min-confidence", "60"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
