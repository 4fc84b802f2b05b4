"""Error feedback on a non-contractive codec (q >= 1) is warned about by ``check`` and at run start.

Study 3 of docs/experiments.md found qsgd s = 1 (bucket 512, q = 22.6) with error feedback diverging in
every seed; topk and sign (q < 1, contractions) are stable with it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import run_cli, small_config
from qmlhfl_mpi.config import build, load_config


@pytest.mark.parametrize("quantizer, warned", [
    ({"levels": [1, 8], "bucket": 16, "error_feedback": [True, False]}, [1]),       # qsgd q = min(16, 4) = 4
    ({"levels": [8, 1], "bucket": 16, "error_feedback": [True, True]}, [2]),        # q = 0.5 on link 1: fine
    ({"levels": [1, 8], "bucket": 16, "error_feedback": [False, True]}, []),         # EF only where q < 1
    ({"kind": ["topk", "sign"], "levels": [1, 1], "bucket": 16, "error_feedback": [True, True]}, []),
    ({"kind": ["round", "qsgd"], "levels": [1, 8], "bucket": 16, "error_feedback": [True, False]}, [1]),  # q = 1
])
def test_the_warning_names_exactly_the_non_contractive_links(tmp_path, quantizer, warned):
    cfg = load_config(str(small_config(tmp_path, quantizer=quantizer)))
    codecs = build.codecs(cfg)
    dim = build.model_dim(cfg)
    got = build.error_feedback_warnings(cfg.quantizer.error_feedback, codecs, dim)
    assert [int(w.split("link ")[1].split()[0]) for w in got] == warned
    for w in got:
        assert "q = " in w and "contractive" in w and "switch error feedback off" in w


def test_check_and_run_print_the_warning(tmp_path):
    path = small_config(tmp_path, quantizer={"levels": [1, 8], "bucket": 16, "error_feedback": [True, False]},
                        output={"path": "ef.h5"})
    out = subprocess.run([sys.executable, "-m", "qmlhfl_mpi", "check", str(path), "--L", "1.0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "WARNING: quantizer.error_feedback on link 1 with qsgd(s=1, bucket=16) (q = 4 >= 1)" in out.stdout
    proc, _ = run_cli(2, ["run", str(path), "--quiet"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "quantizer.error_feedback on link 1" in ln]
    assert len(lines) == 1 and "[rank 0] WARNING" in lines[0], proc.stderr   # once, from rank 0
