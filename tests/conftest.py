import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "two_ranks: tests/mpi only: run by the 2-rank pytest-mpi launch and not by the 4-rank one "
        "(tests/test_pytest_mpi.py): more ranks exercise nothing more; rank invariance from 1 to 4 ranks is "
        "tests/mpi/test_engine_matrix.py's")


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under mpiexec with --with-mpi (tests/test_pytest_mpi.py launches it)."""
    if collection_path.name == "mpi" and collection_path.is_dir():
        return not (config.getoption("with_mpi", False) or config.getoption("only_mpi", False))
    return None


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """``reference_run(**sections)``: the results file of the small test config with ``sections`` run to the end
    in this process (``Session`` on ``COMM_SELF``), once per session for each distinct config.  The runs every
    restart must reproduce bit for bit: the trained model does not depend on the rank count
    (tests/mpi/test_engine_matrix.py)."""
    import json

    from mpi4py import MPI

    from helpers import small_config
    from qmlhfl_mpi import Session, load_config

    done: dict[str, Path] = {}

    def run(**sections):
        key = json.dumps(sections, sort_keys=True, default=str)
        if key not in done:
            cfg = load_config(str(small_config(tmp_path_factory.mktemp("reference"), **sections)))
            assert Session(cfg, MPI.COMM_SELF).run().status == "completed"
            done[key] = Path(cfg.output.path)
        return done[key]

    return run
