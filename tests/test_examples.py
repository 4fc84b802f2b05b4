"""The plug-in examples in examples/: each config runs under real ``mpiexec -n 2``
and in process on one rank (``Session`` on ``COMM_SELF``) and gives the same
results; bad plug-in references fail cleanly.  The Arrow example runs in process
on data its generator writes.  The configs use repo-relative plug-in paths, so
every job runs with ``cwd=REPO``."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml

from helpers import REPO, run_cli

EXIT_OK, EXIT_USAGE, EXIT_PREEMPTED = 0, 2, 75
CONFIGS = {name: f"examples/{name}.yaml" for name in ("model", "natural", "callback", "arrow")}


# --------------------------------------------------------------------------- helpers
def _import_file(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolve(ref: str) -> Any:
    """The object a config names: a ``file.py:attr`` reference (imported here
    directly, not through the engine) or a built-in registry name."""
    if ":" not in ref:
        from qmlhfl_mpi.learning.registry import MODELS
        return MODELS.resolve(ref)
    target, _, attr = ref.rpartition(":")
    return getattr(_import_file(REPO / target), attr)


def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / CONFIGS[name]).read_text())


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def _num_devices(cfg: dict[str, Any]) -> int:
    return math.prod(cfg["topology"]["branching"])


def _shape_and_classes(cfg: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    data = cfg["data"]
    if data["name"] == "synthetic":
        return (data["synthetic"]["dim"],), data["synthetic"]["classes"]
    load = _resolve(data["name"])
    x, y, _ = load("ignored", True, **data.get("args", {}))
    _, ty = load("ignored", False, **data.get("args", {}))
    return tuple(x.shape[1:]), int(max(y.max(), ty.max())) + 1


def _read(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {
            "status": str(f.attrs["status"]),
            "num_params": int(f.attrs["num_params"]),
            "final": f["model/final"][()] if "final" in f["model"] else None,
            "train_loss": f["metrics/train_loss"][()],
            "test_accuracy": f["metrics/test_accuracy"][()],
            "samples": f["topology/samples"][()],
        }


def _clean(proc: Any) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@dataclass
class InProcess:
    """What a one-rank run in this process gives, shaped like a finished ``mpiexec`` job."""

    returncode: int
    stderr: str = ""
    cli: bool = False


class Runs:
    """Runs each (key) job once per module and remembers its process and output: ``n = 1`` in this process
    (``Session`` on ``COMM_SELF``, from the repository's directory), more ranks under real ``mpiexec``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, tuple[Any, Path]] = {}

    def get(self, key: str, n: int, config: str, *sets: str, out: Path | None = None,
            resume: bool = False) -> tuple[Any, Path]:
        if key not in self.done:
            out = out or self.root / key / "x.h5"
            out.parent.mkdir(parents=True, exist_ok=True)
            sets = (f"output.path={out}", *sets)
            if n == 1:
                self.done[key] = (_in_process(config, sets, resume), out)
                return self.done[key]
            args = ["run", config, "--quiet"]
            for s in sets:
                args += ["--set", s]
            if resume:
                args.append("--resume")
            proc, _ = run_cli(n, args, cwd=REPO, timeout=180)
            proc.cli = True
            self.done[key] = (proc, out)
        return self.done[key]


def _in_process(config: str, sets: tuple[str, ...], resume: bool) -> InProcess:
    from mpi4py import MPI

    from qmlhfl_mpi import RunError, Session, load_config

    here = os.getcwd()
    os.chdir(REPO)
    try:
        summary = Session(load_config(config, list(sets)), MPI.COMM_SELF).run(resume=resume)
    except RunError as e:
        return InProcess(e.code, str(e))
    finally:
        os.chdir(here)
    return InProcess({"completed": EXIT_OK, "preempted": EXIT_PREEMPTED}.get(summary.status, 1), summary.message)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("examples"))


def _callback_sets(runs: Runs, key: str, **override: Any) -> tuple[str, Path]:
    """``callbacks=[...]`` as in callback.yaml, with the JSON summary in the test's directory."""
    cbs = _config("callback")["callbacks"]
    assert len(cbs) == 1 and cbs[0]["ref"] == "examples/callbacks.py:BestAccuracy"
    summary = runs.root / key / "best.json"
    cbs = [{"ref": cbs[0]["ref"], "args": {**cbs[0].get("args", {}), "path": str(summary), **override}}]
    return "callbacks=" + _flow(cbs), summary


def _callback_run(runs: Runs, n: int) -> tuple[Any, Path, Path]:
    sets, summary = _callback_sets(runs, f"callback-{n}")
    proc, out = runs.get(f"callback-{n}", n, CONFIGS["callback"], sets)
    return proc, out, summary


# --------------------------------------------------------------------------- the three examples
@pytest.mark.parametrize("name", ["model", "natural"])
def test_example_same_on_1_and_2_ranks(runs, name):
    cfg = _config(name)
    res = {}
    for n in (1, 2):
        proc, out = runs.get(f"{name}-{n}", n, CONFIGS[name])
        assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
        _clean(proc)
        res[n] = _read(out)
        assert res[n]["status"] == "completed"
        assert res[n]["final"] is not None and len(res[n]["train_loss"]) == cfg["train"]["rounds"]
    assert np.array_equal(res[1]["final"], res[2]["final"])
    assert np.array_equal(res[1]["train_loss"], res[2]["train_loss"])
    assert np.isfinite(res[1]["train_loss"]).all()

    shape, classes = _shape_and_classes(cfg)
    module = _resolve(cfg["model"]["name"])(shape, classes, **cfg["model"].get("args", {}))
    expected = sum(p.numel() for p in module.parameters())
    assert res[1]["num_params"] == res[2]["num_params"] == expected == res[1]["final"].size


def _owner_counts(owner: np.ndarray, D: int) -> np.ndarray:
    """Training samples per device by the natural rule: sorted owner j -> device floor(j D / O)."""
    ids, inverse = np.unique(owner, return_inverse=True)
    owners = ids.size
    device_of_owner = np.array([j * D // owners for j in range(owners)])
    return np.bincount(device_of_owner[inverse], minlength=D)


def test_natural_split_follows_the_owners(runs):
    cfg = _config("natural")
    assert cfg["data"]["partition"]["kind"] == "natural"
    load = _resolve(cfg["data"]["name"])
    args = cfg["data"]["args"]
    x, y, owner = load("ignored", True, **args)
    assert x.dtype == np.float32 and y.dtype == np.int64 and owner.dtype == np.int64
    assert len(load("ignored", False, **args)) == 2  # the test split has no owners
    # deterministic, and root is not read
    x2, y2, o2 = load("/nonexistent/root", True, **args)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and np.array_equal(owner, o2)

    D = _num_devices(cfg)
    assert np.unique(owner).size == args["writers"] >= D
    expected = _owner_counts(owner, D)
    for n in (1, 2):
        proc, out = runs.get(f"natural-{n}", n, CONFIGS["natural"])
        assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
        assert np.array_equal(_read(out)["samples"], expected)

    # writers not a multiple of the devices: uneven blocks (3, 2, 2, 3, 2, 2 writers for 14 over 6)
    _, _, owner14 = load("ignored", True, **{**args, "writers": 14})
    expected = _owner_counts(owner14, D)
    assert len(set(expected.tolist())) > 1
    proc, out = runs.get("natural-14", 2, CONFIGS["natural"], "data.args.writers=14")
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert np.array_equal(_read(out)["samples"], expected)


def test_natural_split_with_fewer_writers_than_devices_fails_cleanly(tmp_path):
    D = _num_devices(_config("natural"))
    out = tmp_path / "x.h5"
    proc, secs = run_cli(2, ["run", CONFIGS["natural"], "--quiet", "--set", f"output.path={out}",
                             "--set", f"data.args.writers={D - 1}"], cwd=REPO, timeout=60)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert secs < 20
    _clean(proc)
    assert proc.stderr.count("qmlhfl-mpi: error:") == 1, proc.stderr
    assert f"{D - 1} owners" in proc.stderr and f"{D} devices" in proc.stderr
    assert not out.exists()


def test_arrow_example_runs_on_the_data_its_generator_writes(tmp_path):
    """examples/make_arrow.py writes a DatasetDict in seconds; examples/arrow.yaml trains on it (in process, with
    data.root pointed at it) with the writers dealt to the devices by the natural rule."""
    pytest.importorskip("datasets")
    pytest.importorskip("pyarrow")
    cfg = _config("arrow")
    args = cfg["data"]["args"]
    assert cfg["data"]["name"] == "arrow" and cfg["data"]["partition"]["kind"] == "natural"
    assert cfg["data"]["root"] == "results/examples" and args["path"] == "arrow-data"  # make_arrow.py's default
    make = _import_file(REPO / "examples" / "make_arrow.py")
    make.write(tmp_path / "data" / args["path"])
    out = tmp_path / "x.h5"
    proc = _in_process(CONFIGS["arrow"], (f"output.path={out}", f"data.root={tmp_path / 'data'}"), resume=False)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    res = _read(out)
    assert res["status"] == "completed" and len(res["train_loss"]) == cfg["train"]["rounds"]
    assert np.isfinite(res["train_loss"]).all() and res["test_accuracy"][-1] > 0.5  # 5 classes
    writers = make.generate()["train"][args["owner"]]
    D = _num_devices(cfg)
    assert np.unique(writers).size == 50 >= D
    assert np.array_equal(res["samples"], _owner_counts(writers, D))
    module = _resolve(cfg["model"]["name"])((20,), 5, **cfg["model"].get("args", {}))
    assert res["num_params"] == sum(p.numel() for p in module.parameters()) == res["final"].size


def _expected_stop(acc: np.ndarray, patience: int, target: float | None) -> int | None:
    """The round after which BestAccuracy asks to stop, recomputed from the metrics."""
    best, stale = -math.inf, 0
    for t, a in enumerate(acc):
        if not np.isfinite(a):
            continue
        if a > best:
            best, stale = a, 0
        else:
            stale += 1
        if (target is not None and a >= target) or stale >= patience:
            return t
    return None


def test_callback_example_stops_the_same_on_1_and_2_ranks(runs):
    cfg = _config("callback")
    res = {}
    for n in (1, 2):
        proc, out, summary = _callback_run(runs, n)
        assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
        _clean(proc)
        assert proc.stderr.count("qmlhfl-mpi: stopped:") == (1 if proc.cli else 0)
        res[n] = _read(out)
        assert res[n]["status"] == "preempted" and res[n]["final"] is None
        assert Path(f"{out}.ckpt").is_file()
        line = json.loads(summary.read_text())
        rows = len(res[n]["train_loss"])
        assert line["status"] == "preempted" and line["rounds_done"] == rows
        assert line["best_accuracy"] == float(np.nanmax(res[n]["test_accuracy"]))
        assert line["stopped_because"]
        args = cfg["callbacks"][0]["args"]
        assert _expected_stop(res[n]["test_accuracy"], args["patience"], args.get("target")) == rows - 1
        assert rows < cfg["train"]["rounds"]
    assert np.array_equal(res[1]["train_loss"], res[2]["train_loss"])
    assert np.array_equal(res[1]["test_accuracy"], res[2]["test_accuracy"])
    shape, classes = _shape_and_classes(cfg)
    module = _resolve(cfg["model"]["name"])(shape, classes, **cfg["model"].get("args", {}))
    assert res[1]["num_params"] == res[2]["num_params"] == sum(p.numel() for p in module.parameters())


def _uninterrupted(runs: Runs) -> dict[str, Any]:
    proc, out = runs.get("callback-none", 1, CONFIGS["callback"], "callbacks=[]")
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    res = _read(out)
    assert res["status"] == "completed" and len(res["train_loss"]) == _config("callback")["train"]["rounds"]
    return res


def test_callback_example_resumes_to_the_uninterrupted_model(runs):
    """Each stopped run resumed on the other rank count, without the callback,
    ends bit-identical to a run that never had the callback."""
    ref = _uninterrupted(runs)
    for n_stop, n_resume in ((1, 2), (2, 1)):
        _, out, _ = _callback_run(runs, n_stop)
        proc, _ = runs.get(f"resume-{n_stop}-{n_resume}", n_resume, CONFIGS["callback"], "callbacks=[]",
                           out=out, resume=True)
        assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
        _clean(proc)
        res = _read(out)
        assert res["status"] == "completed"
        assert np.array_equal(res["final"], ref["final"])
        assert np.array_equal(res["train_loss"], ref["train_loss"])
        assert not Path(f"{out}.ckpt").exists()


def test_callback_target_stops_after_the_first_round_and_resumes(runs):
    sets, summary = _callback_sets(runs, "target", target=0.0)
    proc, out = runs.get("target", 1, CONFIGS["callback"], sets)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    _clean(proc)
    res = _read(out)
    assert res["status"] == "preempted" and len(res["train_loss"]) == 1
    line = json.loads(summary.read_text())
    assert line["rounds_done"] == 1 and "target" in line["stopped_because"]

    proc, _ = runs.get("target-resume", 1, CONFIGS["callback"], "callbacks=[]", out=out, resume=True)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    res = _read(out)
    ref = _uninterrupted(runs)
    assert res["status"] == "completed"
    assert np.array_equal(res["final"], ref["final"])
    assert np.array_equal(res["train_loss"], ref["train_loss"])


# --------------------------------------------------------------------------- bad references
_NOT_A_MODULE = "def build(input_shape, num_classes, **kw):\n    return 3\n"
_WRONG_WIDTH = (
    "import math\nfrom torch import nn\n\n"
    "def build(input_shape, num_classes, **kw):\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))\n"
)
BAD = {
    "no-file": (None, "examples/nope.py:build"),
    "no-attribute": (None, "examples/custom_model.py:nope"),
    "not-callable": (None, "examples/custom_model.py:DEFAULT_WIDTH"),
    "not-a-module": (_NOT_A_MODULE, "{tmp}/bad.py:build"),
    "wrong-output-shape": (_WRONG_WIDTH, "{tmp}/bad.py:build"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_reference_fails_cleanly(tmp_path, case):
    source, ref = BAD[case]
    if source is not None:
        (tmp_path / "bad.py").write_text(source)
    ref = ref.format(tmp=tmp_path)
    out = tmp_path / "x.h5"
    proc = _in_process(CONFIGS["model"], (f"output.path={out}", f"model.name={ref}"), resume=False)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    assert ref in proc.stderr
    assert not out.exists()
