"""Shared test utilities: launching real ``mpiexec`` jobs and small configs."""
from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def mpiexec_path() -> str:
    """The MPI launcher next to this Python (the venv's, from the mpich wheel),
    else ``$QMLHFL_MPIEXEC``, else the one on PATH."""
    if os.environ.get("QMLHFL_MPIEXEC"):
        return os.environ["QMLHFL_MPIEXEC"]
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec found: install the 'mpich' extra or set QMLHFL_MPIEXEC")
    return found


@functools.cache
def mpi_flavour(launcher: str) -> str:
    """``openmpi`` or ``mpich`` (Hydra), from the launcher's ``--version``."""
    out = subprocess.run([launcher, "--version"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    text = out.stdout + out.stderr
    return "openmpi" if "Open MPI" in text or "OpenRTE" in text or "open-mpi.org" in text else "mpich"


def launch_flags(launcher: str) -> list[str]:
    """What the launcher needs here: Open MPI refuses more ranks than cores and, as root, to start at all,
    unless told (docs/hpc.md)."""
    if mpi_flavour(launcher) != "openmpi":
        return []
    return ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def mpiexec_cmd(n: int) -> list[str]:
    """The launcher, its flags for this machine, and ``-n n``."""
    launcher = mpiexec_path()
    return [launcher, *launch_flags(launcher), "-n", str(n)]


def clean_env(**extra: str) -> dict[str, str]:
    """Environment for a child job: no inherited MPI/PMI state, one thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "MPI_", "HYDRA_", "OMPI_", "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_mpi(n: int, args: list[str], *, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``mpiexec -n n <args>``; returns the completed process and wall seconds."""
    cmd = [*mpiexec_cmd(n), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return proc, time.monotonic() - t0


def run_cli(n: int, cli_args: list[str], **kw: Any) -> tuple[subprocess.CompletedProcess, float]:
    return run_mpi(n, [sys.executable, "-m", "qmlhfl_mpi", *cli_args], **kw)


SMALL: dict[str, Any] = {
    "topology": {"branching": [2, 3]},
    "tau": [2, 2],
    "quantizer": {"levels": [3, 8], "bucket": 16},
    # vectorize off: a process's first batched step imports torch._dynamo (torch.func's grad does), about 1.4 s on
    # this machine, which every launched rank of a test would pay for a few steps; the batched path has its own tests
    "train": {"lr": 0.1, "batch_size": 8, "rounds": 2, "seed": 7, "eval_every": 1, "vectorize": "off"},
    "data": {"name": "synthetic", "synthetic": {"dim": 6, "classes": 3, "samples": 24}},
    "model": {"name": "mlp", "args": {"hidden": 5}},
    "output": {"path": "out.h5"},
}


# every option at once on an unbalanced three-layer tree (participation, top-k with error feedback, downlinks,
# server optimisers): the engine matrix and the byte accounting use it
EVERYTHING: dict[str, Any] = dict(
    topology={"tree": [[3, 2], [1, 2]]}, tau=[2, 2, 1],
    quantizer={"levels": [4, 8, 16], "bucket": 8, "kind": ["topk", "qsgd", "qsgd"], "topk_fraction": [0.25, 0.01, 0.01],
               "error_feedback": [True, True, False], "downlink": [0, 8, 16]},
    participation={"fraction": [0.6, 1.0, 1.0], "availability": [1.0, 0.75, 1.0]},
    server={"optimizer": ["momentum", "avg", "adam"], "lr": [1.0, 1.0, 0.05]},
)


def small_config(tmp_path: Path, name: str = "cfg.yaml", **sections: Any) -> Path:
    """Write the small test config with top-level sections replaced/merged."""
    cfg = copy.deepcopy(SMALL)
    for key, val in sections.items():
        if isinstance(val, dict) and isinstance(cfg.get(key), dict) and key != "topology":
            cfg[key] = {**cfg[key], **val}
        else:
            cfg[key] = val
    cfg["output"]["path"] = str(tmp_path / cfg["output"]["path"])
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def killed_run(n: int, cfg: Path, out: Path, *sets: str, rank: int = 1, round_: int = 3) -> list[str]:
    """Run ``cfg`` on ``n`` ranks into ``out`` (with ``--set`` ``sets``), rank ``rank`` SIGKILLed after
    round ``round_``'s checkpoint; returns the checkpoint's state entry names (it holds ``round_`` rounds)."""
    import h5py

    from fault_plugin import spec as fault

    args = ["run", str(cfg), "--quiet", "--set", f"output.path={out}"]
    for s in sets:
        args += ["--set", s]
    proc, _ = run_cli(n, [*args, "--set", fault("kill", rank=rank, round=round_)], timeout=120)
    assert proc.returncode != 0, "the killed run ended normally"
    ck = Path(str(out) + ".ckpt")
    deadline = time.monotonic() + 10
    while not ck.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with h5py.File(ck) as f:
        assert int(f.attrs["rounds_done"]) == round_
        return sorted(f["state"])


def bench(*args: str, timeout: float = 180) -> str:
    """Run a benchmark script (``benchmarks/...``) with this Python from the repository; its printed output."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def wait_until_released(lock: Path, timeout: float = 20.0) -> None:
    """Until a killed job's output lock is gone or its holder's process has ended (Open MPI's mpiexec can return
    while rank 0 is still being ended)."""
    import json
    import os
    import time

    deadline = time.monotonic() + timeout
    while lock.exists() and time.monotonic() < deadline:
        try:
            os.kill(int(json.loads(lock.read_text())["pid"]), 0)
        except (ProcessLookupError, ValueError, KeyError, FileNotFoundError):
            return
        time.sleep(0.2)
