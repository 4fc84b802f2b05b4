"""The SLURM job scripts under a real SLURM: a one-node cluster on this machine.

The session fixture starts munge, slurmctld and slurmd with
``tests/slurm/start_slurm.sh`` (CI installs the Debian packages first). The tests
are skipped, with the reason printed, only where SLURM cannot be run here: its
commands are not installed, or we are not root. A cluster that fails to start
is a test failure, not a skip.

There is no slurmdbd (so no ``sacct``): jobs are followed with
``scontrol show job``, which keeps finished jobs for MinJobAge = 1 h. Every wait
is bounded.

The time-limit test's job waits up to 30 s for SLURM's warning signal, mostly
asleep: it is submitted before this file's first test and followed by a thread,
so the other tests run meanwhile (the one-node cluster has room for both).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fault_plugin import spec as fault
from helpers import REPO, clean_env, small_config

START = REPO / "tests" / "slurm" / "start_slurm.sh"
RUN = REPO / "jobs" / "run.sbatch"
SWEEP = REPO / "jobs" / "sweep.sbatch"
GATE = REPO / "tests" / "slurm" / "gate.py"
POLL = 0.2  # seconds between two `scontrol show job`
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def _missing() -> str | None:
    """Why SLURM cannot run here, or None."""
    for cmd in ("sbatch", "scontrol", "squeue", "scancel"):
        if not shutil.which(cmd):
            return f"'{cmd}' not found"
    for daemon in ("slurmctld", "slurmd", "munged"):
        if not (shutil.which(daemon) or Path("/usr/sbin", daemon).exists()):
            return f"'{daemon}' not found"
    if os.geteuid() != 0:
        return "not root (starting slurmctld/slurmd/munged needs root)"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    why = _missing()
    if why:
        msg = (f"SLURM tests skipped: {why}; install with "
               "'apt-get install -y slurmctld slurmd slurm-client munge' and run as root")
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    print(f"{proc.stdout.strip()} [fixture: {took:.1f} s]", file=sys.stderr)
    if proc.returncode != 0:
        pytest.fail(f"tests/slurm/start_slurm.sh failed (exit {proc.returncode}, {took:.1f} s):\n"
                    f"{proc.stdout}\n{proc.stderr}")


def _env(**extra: str) -> dict[str, str]:
    # the job runs this Python (and the mpiexec beside it); no inherited SLURM_/PMI_ state
    return clean_env(QMLHFL_PYTHON=sys.executable, **extra)


# rounds of the small config take milliseconds on an idle machine: slow them down
# (the test-only fault plug-in, loaded as a config callback) so that a signal
# sent after the first checkpoint always lands before the run ends
SLOW = ["--set", fault("delay", seconds=0.1)]

# these tests are about the job scripts, not the training: the unbatched trainer spares every rank the ~1 s
# that torch.func's first use takes to import torch._dynamo (batched training: tests/mpi/test_engine_matrix.py)
TRAIN = {"vectorize": "off"}


def slow_while(path: Path, seconds: float = 0.1) -> list[str]:
    """Like SLOW, but only while the file ``path`` exists (tests/slurm/gate.py): a test removes it once the
    run it slowed down has stopped, and a resumed run (same arguments) goes at full speed."""
    return ["--set", f"callbacks=[{{ref: '{GATE}:SlowWhile', args: {{path: '{path}', seconds: {seconds}}}}}]"]


def sbatch(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"sbatch {args} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def submit_until_checkpoint(tmp_path: Path, cfg: Path, name: str, cancel_jobs: list[str], slow: list[str] = SLOW,
                            env: dict[str, str] | None = None) -> tuple[str, Path, Path, Path]:
    """sbatch a slowed-down run and wait for its first checkpoint, which shows
    the ranks are up and trapping signals.  Returns (job, output, checkpoint, log)."""
    out, ckpt = tmp_path / f"{name}.h5", tmp_path / f"{name}.h5.ckpt"
    job = sbatch(["--ntasks=2", f"--output={tmp_path}/slurm-%j.out", str(RUN), str(cfg), "--quiet",
                  "--set", f"output.path={out}", *slow], cwd=REPO, env=env or _env())
    cancel_jobs.append(job)
    log = tmp_path / f"slurm-{job}.out"
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        info = job_info(job)[0]
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"job ended before its first checkpoint: {info}\n{log.read_text() if log.exists() else ''}"
        assert time.monotonic() < deadline, f"no checkpoint within 120 s\n{log.read_text() if log.exists() else ''}"
        time.sleep(0.1)
    return job, out, ckpt, log


def job_info(job: str) -> list[dict[str, str]]:
    """One dict (JobState, Restarts, ExitCode, ...) per job / array task."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"scontrol show job {job}: {proc.stderr}"
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]


def wait_for(job: str, done, timeout: float, what: str, log: Path | None = None) -> list[dict[str, str]]:
    t0 = time.monotonic()
    while True:
        info = job_info(job)
        if done(info):
            return info
        if time.monotonic() - t0 > timeout:
            subprocess.run(["scancel", job], timeout=30)
            text = log.read_text() if log is not None and log.exists() else "(no log)"
            pytest.fail(f"job {job}: no {what} within {timeout:.0f} s; last state {info}\n--- job log ---\n{text}")
        time.sleep(POLL)


class Watch(threading.Thread):
    """Follows ``job`` from a thread until ``done(info)`` or ``timeout`` seconds, then cancels it (a requeued
    job must not run again).  ``info`` is the last state seen; ``error`` what went wrong in the thread."""

    def __init__(self, job: str, done, timeout: float) -> None:
        super().__init__(daemon=True)
        self.job, self.done, self.timeout = job, done, timeout
        self.info: list[dict[str, str]] = []
        self.error: str | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            while True:
                self.info = job_info(self.job)
                if self.done(self.info):
                    break
                if time.monotonic() - t0 > self.timeout:
                    self.error = f"not done within {self.timeout:.0f} s"
                    break
                time.sleep(POLL)
        except BaseException as e:  # noqa: BLE001 - reported by the test that joins the thread
            self.error = f"{type(e).__name__}: {e}"
        finally:
            subprocess.run(["scancel", self.job], capture_output=True, timeout=30)


def requeued_or_final(info: list[dict[str, str]]) -> bool:
    return int(info[0].get("Restarts", 0)) >= 1 or all_final(info)


def log_with(log: Path, *lines: str, timeout: float = 10) -> str:
    """The job log once it holds every one of ``lines`` (or after ``timeout`` s: the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        if all(line in text for line in lines) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def all_final(info: list[dict[str, str]]) -> bool:
    return bool(info) and all(i.get("JobState") in FINAL for i in info)


def h5(path: Path) -> tuple[str, int, np.ndarray]:
    with h5py.File(path, "r") as f:
        return str(f.attrs["status"]), int(f["metrics/round"].shape[0]), f["model/final"][()]


@pytest.fixture
def cancel_jobs():
    """Cancel whatever a test submitted, even when it fails half-way."""
    jobs: list[str] = []
    yield jobs
    for j in jobs:
        subprocess.run(["scancel", j], capture_output=True, timeout=30)


@pytest.mark.parametrize("launcher", ["auto", "mpiexec"])
def test_sbatch_single_run(slurm, cancel_jobs, tmp_path: Path, launcher: str) -> None:
    """sbatch jobs/run.sbatch CONFIG: default output path, both launchers."""
    t0 = time.monotonic()
    small_config(tmp_path, train={"rounds": 3, **TRAIN})
    job = sbatch(["--ntasks=2", f"--output={tmp_path}/slurm-%j.out", str(RUN), "cfg.yaml", "--quiet"],
                 cwd=tmp_path, env={**_env(), "QMLHFL_LAUNCHER": launcher})
    cancel_jobs.append(job)
    log = tmp_path / f"slurm-{job}.out"
    info = wait_for(job, all_final, 180, "end", log)[0]
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    if launcher == "auto":  # srun --mpi=pmi2 must be able to start the mpich wheel's ranks
        assert "launcher srun" in text, text
    else:
        assert "launcher mpiexec" in text, text
    out = tmp_path / "results" / f"cfg-{job}.h5"  # results/<config stem>-<job id>.h5
    status, rows, _ = h5(out)
    assert (status, rows) == ("completed", 3)
    with h5py.File(out, "r") as f:
        assert int(f.attrs["world_size"]) == 2
    print(f"sbatch single run ({launcher}): {time.monotonic() - t0:.1f} s", file=sys.stderr)


def test_sbatch_checkpoint_requeue_resume(slurm, cancel_jobs, reference_run, tmp_path: Path) -> None:
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N sends before the time
    limit): the ranks checkpoint and exit 75, the script requeues the job, the
    requeued job resumes, and the final model equals an uninterrupted run's
    (in this process on one rank: the model does not depend on the rank count)."""
    t0 = time.monotonic()
    rounds = 100
    cfg = small_config(tmp_path, train={"rounds": rounds, **TRAIN})
    gate = tmp_path / "slow"  # the first run sleeps 0.1 s a round while it exists
    gate.touch()
    # run.sbatch holds a signal until GRACE s after the launch (Python's handlers may not be installed before);
    # the first checkpoint shows they are, so 2 s instead of 5: the signal below is still held, for a shorter time
    job, out, ckpt, log = submit_until_checkpoint(tmp_path, cfg, "pre", cancel_jobs, slow=slow_while(gate),
                                                  env=_env(QMLHFL_SIGNAL_GRACE="2"))
    sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr

    # exit 75 -> scontrol requeue -> pending with Restarts=1
    info = wait_for(job, requeued_or_final, 120, "requeue", log)[0]
    gate.unlink()  # the first run has ended (the script requeues after it): the resumed run need not sleep
    text = log.read_text()
    assert int(info.get("Restarts", 0)) == 1, f"job was not requeued: {info}\n{text}"
    assert "qmlhfl-mpi exited with 75" in text and "requeueing job" in text and "got SIGUSR1" in text, text
    if info["JobState"] == "PENDING":  # between the two runs (SLURM holds it cred_expire + 1 = 6 s)
        assert ckpt.exists(), "exit 75 but no checkpoint file"
        with h5py.File(out, "r") as f:
            assert f.attrs["status"] != "completed"
            stopped_at = int(f["metrics/round"].shape[0])
        assert 1 <= stopped_at < rounds, stopped_at

    # the uninterrupted reference, while SLURM holds the requeued job (in process: two more busy-polling MPICH
    # ranks beside the resumed job's would slow both down on a 2-core machine)
    ref = reference_run(train={"rounds": rounds, **TRAIN})

    info = wait_for(job, all_final, 180, "end after the requeue", log)[0]
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert "resuming" in text and "--resume" in text, text
    status, rows, model = h5(out)
    assert (status, rows) == ("completed", rounds)
    with h5py.File(out, "r") as f:
        resumed = list(f.attrs.get("resumed_at_rounds", [])) if "resumed_at_rounds" in f.attrs else None
    if resumed is not None:
        assert len(resumed) == 1 and 1 <= resumed[0] < rounds, resumed
    _, _, ref_model = h5(ref)
    assert np.array_equal(model, ref_model), "resumed run's /model/final differs from the uninterrupted run's"
    print(f"sbatch checkpoint/requeue/resume: {time.monotonic() - t0:.1f} s", file=sys.stderr)


TIME_LIMIT_TEST = "test_time_limit_signal_checkpoints_and_requeues"


@pytest.fixture(scope="module", autouse=True)
def time_limit_job(request, tmp_path_factory):
    """The time-limit test's job, submitted before this file's first test (only when that test was selected)
    and followed by a thread (:class:`Watch`) until it is requeued or ends; the thread then cancels it.
    Yields (job, output, log, watch, submit time)."""
    if not any(item.name == TIME_LIMIT_TEST for item in request.session.items):
        yield None
        return
    request.getfixturevalue("slurm")  # skipped, or failed, as every test here
    tmp = tmp_path_factory.mktemp("time_limit")
    t0 = time.monotonic()
    cfg = small_config(tmp, train={"rounds": 100000, **TRAIN})
    out = tmp / "t.h5"
    # mpiexec: no srun probe, so the signal hardly can come before the launch (the script would then requeue
    # without running), and hydra's forwarding of SIGUSR1 is covered (the other jobs here forward through
    # srun). Rounds sleep 0.25 s: the job mostly idles while the other tests run.
    job = sbatch(["--ntasks=2", "--time=1", "--signal=B:USR1@45", f"--output={tmp}/slurm-%j.out",
                  str(RUN), str(cfg), "--quiet", "--set", f"output.path={out}",
                  "--set", fault("delay", seconds=0.25)], cwd=REPO, env={**_env(), "QMLHFL_LAUNCHER": "mpiexec"})
    watch = Watch(job, requeued_or_final, 150)
    watch.start()
    yield job, out, tmp / f"slurm-{job}.out", watch, t0
    subprocess.run(["scancel", job], capture_output=True, timeout=30)  # (if the test did not run to the end)
    watch.join(timeout=30)


def test_time_limit_signal_checkpoints_and_requeues(time_limit_job) -> None:
    """The real thing: --time=1 --signal=B:USR1@45. SLURM checks signal
    deadlines with its time limits, every 30 s, and may signal that much early:
    SIGUSR1 reaches the batch shell at the first check after the start, 0-30 s
    in; the run (far too long to finish) must checkpoint, exit 75 and requeue
    itself. The job was submitted before this file's first test (the
    time_limit_job fixture). The resumed run is cancelled: resumption and
    bit-exactness are covered above."""
    job, out, log, watch, t0 = time_limit_job
    watch.join(timeout=180)
    text = log.read_text() if log.exists() else "(no log)"
    assert not watch.is_alive() and watch.error is None, f"job {job}: {watch.error}; last state {watch.info}\n{text}"
    info = watch.info[0]
    assert int(info.get("Restarts", 0)) == 1 and info["JobState"] != "TIMEOUT", f"{info}\n{text}"
    text = log_with(log, "requeueing job")
    assert "got SIGUSR1" in text and "qmlhfl-mpi exited with 75" in text and "requeueing job" in text, text
    assert "launcher mpiexec" in text, text
    assert Path(f"{out}.ckpt").exists()
    print(f"time-limit signal: {time.monotonic() - t0:.1f} s from the submission", file=sys.stderr)


def test_scancel_checkpoints_but_does_not_requeue(slurm, cancel_jobs, tmp_path: Path) -> None:
    """Plain scancel (SIGTERM to every process): the ranks still checkpoint and
    exit 75, but the script must not requeue (a requeue would undo the cancel)."""
    t0 = time.monotonic()
    cfg = small_config(tmp_path, train={"rounds": 300, **TRAIN})
    job, out, ckpt, log = submit_until_checkpoint(tmp_path, cfg, "c", cancel_jobs)
    subprocess.run(["scancel", job], check=True, timeout=30)
    # CANCELLED only once every process of the job, the batch shell included, has ended (COMPLETING before)
    info = wait_for(job, all_final, 60, "end after scancel", log)[0]
    text = log_with(log, "not requeueing", "qmlhfl-mpi exited with 75")
    assert info["JobState"] == "CANCELLED" and int(info.get("Restarts", 0)) == 0, f"{info}\n{text}"
    assert "not requeueing" in text and "qmlhfl-mpi exited with 75" in text, text
    assert ckpt.exists()
    time.sleep(1)
    assert job_info(job)[0]["JobState"] == "CANCELLED"  # and it stays cancelled
    print(f"scancel: {time.monotonic() - t0:.1f} s", file=sys.stderr)


def test_sbatch_sweep_array(slurm, cancel_jobs, tmp_path: Path) -> None:
    """jobs/sweep.sbatch: one run and one output file per array task."""
    t0 = time.monotonic()
    small_config(tmp_path, train={"rounds": 2, **TRAIN})
    (tmp_path / "sweep.txt").write_text("# lr sweep\ncfg.yaml --set train.lr=0.1\n\n"
                                        "cfg.yaml --set train.lr=0.05 --set quantizer.levels=[2,none]\n")
    job = sbatch(["--array=0-1", "--ntasks=1", f"--output={tmp_path}/slurm-%A_%a.out", str(SWEEP), "sweep.txt"],
                 cwd=tmp_path, env={**_env(), "QMLHFL_REPO": str(REPO)})
    cancel_jobs.append(job)
    info = wait_for(job, lambda i: len(i) == 2 and all_final(i), 180, "end of both array tasks")
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert all(i["JobState"] == "COMPLETED" for i in info), f"{info}\n{logs}"
    models = []
    for task in (0, 1):
        status, rows, model = h5(tmp_path / "results" / f"cfg-{job}_{task}.h5")
        assert (status, rows) == ("completed", 2)
        models.append(model)
    assert not np.array_equal(*models)
    print(f"sbatch sweep array: {time.monotonic() - t0:.1f} s", file=sys.stderr)
