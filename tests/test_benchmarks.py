"""The benchmarks run (smoke test only: tiny sizes, seconds; no timing is asserted).  The smokes of the
mpiexec benchmarks run their jobs at once (round, algorithms: on one rank each, so two jobs fill two cores;
the GPU check needs its 1- and 2-rank jobs).  The one-process smokes start together, two at a time (the
fixture ``outputs``), so the suite's second core is not idle while they import torch."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import REPO, bench, clean_env

CONCURRENT = {  # one process each, no mpiexec: started two at a time
    "codec": ("benchmarks/codec.py", "--d", "5000", "--repeat", "2", "--levels", "4", "16"),
    "vectorize": ("benchmarks/vectorize.py", "--smoke"),
    "clock": ("benchmarks/clock.py", "--smoke"),
}


def _run(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def outputs() -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CONCURRENT, pool.map(_run, CONCURRENT.values())))


def smoke(outputs, name: str) -> str:
    proc = outputs[name]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_codec_benchmark_prints_every_codec_and_the_floor(outputs):
    out = smoke(outputs, "codec")
    assert "memory floor" in out
    for name in ("qsgd(s=4, bucket=512)", "qsgd(s=16, bucket=512)", "none"):
        assert name in out


def test_round_benchmark_smoke():
    out = bench("benchmarks/round.py", "--smoke", "--ranks", "1")
    lines = [ln for ln in out.splitlines() if ln.startswith("mlp-200")]
    assert len(lines) == 2 and lines[0].split()[-1] == "1.000"
    assert [ln.split()[2] for ln in lines] == ["float32", "s=16"]
    assert all(float(ln.split()[4]) > 0 for ln in lines)  # the median round time, from each run's results file


def test_vectorize_benchmark_smoke(outputs):
    out = smoke(outputs, "vectorize")
    assert "speed-up" in out and out.strip().splitlines()[-1].endswith("x")


def test_scale_benchmark_smoke():
    out = bench("benchmarks/scale.py", "--smoke")  # a 2-rank job: alone
    row = out.strip().splitlines()[-1].split()
    assert row[:3] == ["10000", "1,1,1", "0.1"] and float(row[4]) > 0 and row[5] == "1.00"
    assert float(row[-2]) > 0 and 0 < float(row[-1]) < 50  # the memory check's estimate; MB of 100 rounds' file


def test_algorithms_benchmark_smoke():
    out = bench("benchmarks/algorithms.py", "--smoke", "--ranks", "1")
    rows = [ln.split() for ln in out.strip().splitlines()[1:]]
    assert len(rows) == 2 and all(r[0] == "quickstart" for r in rows)
    assert all(0 <= float(r[-5]) <= 1 for r in rows)  # the final accuracy, from each run's results file
    assert all(float(r[-1]) > 0 for r in rows)  # seconds a run took
    up = [float(r[-3]) for r in rows]
    assert up[1] < up[0]  # top-k 1% on link 1 sends fewer bytes than qsgd s=4


def test_gpu_check_smoke_on_the_cpu():
    """The prepared GPU check, in its CPU form: device aggregation on 1 and 2 ranks gives one model,
    and the host backend the same one."""
    out = bench("benchmarks/gpu_check.py", "--device", "cpu", "--smoke")
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("quickstart")]
    assert [(r[1], r[2], r[-1]) for r in rows] == [("1", "torch:cpu", "yes"), ("2", "torch:cpu", "yes"),
                                                   ("1", "host", "yes")]
    assert "device aggregation: bit-identical across rank counts" in out
    assert "host aggregation: the same model as device aggregation" in out


def test_clock_benchmark_smoke(outputs):
    out = smoke(outputs, "clock")
    rows = [ln.split() for ln in out.strip().splitlines() if ln.split() and ln.split()[0] == "200"]
    assert [r[2] for r in rows] == ["all", "deadline", "first_k", "moving"]
    assert float(rows[0][3]) > 0 and float(rows[0][4]) > 0  # milliseconds of the plan, seconds of the round
