import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under mpiexec with --with-mpi (tests/test_pytest_mpi.py launches it)."""
    if collection_path.name == "mpi" and collection_path.is_dir():
        return not (config.getoption("with_mpi", False) or config.getoption("only_mpi", False))
    return None
