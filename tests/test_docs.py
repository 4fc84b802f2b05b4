"""The documentation stays true to the code: the generated config table is
current, the README's three commands are there, docs/results.md names every
metric, and its h5py/pandas example runs on a real results file."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from helpers import REPO, run_cli, small_config

DOCS = REPO / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_doc", DOCS / "gen_config_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_doc_table_is_up_to_date():
    gen = _generator()
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    assert gen.render(text) == text, "docs/config.md is stale: run  python docs/gen_config_doc.py"


def test_config_doc_lists_every_schema_key():
    from qmlhfl_mpi.config import schema

    text = (DOCS / "config.md").read_text(encoding="utf-8")
    missing = [key for key, _, _ in schema() if f"| `{key}` |" not in text]
    assert not missing, f"keys missing from docs/config.md: {missing}"


@pytest.mark.parametrize("command", [
    "python3 -m venv .venv && .venv/bin/pip install -e '.[mpich,test]'",
    ".venv/bin/mpiexec -n 4 .venv/bin/qmlhfl-mpi run configs/quickstart.yaml",
    ".venv/bin/python -m pytest",
], ids=["install", "quickstart", "test"])
def test_readme_has_the_three_commands(command):
    assert command in (REPO / "README.md").read_text(encoding="utf-8")


def test_results_doc_names_every_metric():
    from qmlhfl_mpi.results import SCALAR_METRICS

    text = (DOCS / "results.md").read_text(encoding="utf-8")
    missing = [k for k in (*SCALAR_METRICS, "uplink_bytes") if f"| `{k}` |" not in text]
    assert not missing, f"metrics missing from docs/results.md: {missing}"


def test_results_doc_example_runs_on_a_real_file(tmp_path):
    pytest.importorskip("pandas")
    cfg = small_config(tmp_path, train={"rounds": 3, "eval_every": 2})
    proc, _ = run_cli(2, ["run", str(cfg), "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = (DOCS / "results.md").read_text(encoding="utf-8")
    block = re.search(r"## Reading a file with h5py and pandas\s+```python\n(.*?)```", text, re.S)
    assert block, "docs/results.md lost its example"
    code = block.group(1)
    assert 'path = "results/quickstart.h5"' in code
    script = tmp_path / "example.py"
    script.write_text(code.replace('"results/quickstart.h5"', repr(str(tmp_path / "out.h5"))))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("completed N = 2 levels [3, 8]")
    # rounds 1 and 2 are evaluated (eval_every=2 and the last round); round 0 is NaN and left out
    assert [ln.split()[0] for ln in lines[3:]] == ["1", "2"]
