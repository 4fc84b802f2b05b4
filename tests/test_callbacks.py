"""Built-in callbacks on real runs: the CSV log and TensorBoard scalars read back, the
console table's ETA, the missing-extra error, and the callbacks a config names."""
from __future__ import annotations

import copy
import csv
import io
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from helpers import SMALL
from qmlhfl_mpi import Callback, ConsoleTable, RunError, Session, load_config


def config(tmp_path, **output):
    raw = copy.deepcopy(SMALL)
    raw["train"]["rounds"] = 4
    raw["output"] = {"path": str(tmp_path / "run.h5"), **output}
    return load_config(raw)


def self_comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


class StopAfter(Callback):
    def __init__(self, k):
        self.k = k

    def on_round_end(self, session, record):
        return record["round"] == self.k


def metrics(path):
    with h5py.File(path, "r") as f:
        return {k: f["metrics"][k][()] for k in f["metrics"]}


def test_csv_log_has_every_round_and_matches_the_hdf5_file_also_across_a_resume(tmp_path):
    cfg = config(tmp_path, csv=True)
    assert Session(cfg, self_comm()).run([StopAfter(1)]).status == "preempted"
    assert Session(cfg, self_comm()).run(resume=True).status == "completed"
    with open(tmp_path / "run.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    m = metrics(tmp_path / "run.h5")
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]  # each round once, in order
    for key in ("train_loss", "test_loss", "test_accuracy", "time_round", "modelled_time"):
        assert np.array_equal(np.array([float(r[key]) for r in rows]), m[key]), key  # repr() keeps every bit
    for n in (1, 2):
        for key in ("uplink_bytes", "messages", "downlink_bytes"):
            assert [int(r[f"{key}_{n}"]) for r in rows] == m[key][:, n - 1].tolist(), (key, n)


def test_tensorboard_scalars_are_written_and_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    Session(config(tmp_path, tensorboard=str(logdir)), self_comm()).run()
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"test/accuracy", "test/loss", "train/loss", "uplink_MB/link_1", "uplink_MB/link_2",
            "time/time_round"} <= tags
    m = metrics(tmp_path / "run.h5")
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert np.allclose([e.value for e in events], m["train_loss"], rtol=1e-6)  # TensorBoard stores float32
    up = acc.Scalars("uplink_MB/link_1")
    assert np.allclose([e.value for e in up], m["uplink_bytes"][:, 0] / 1e6, rtol=1e-6)


def test_missing_tensorboard_names_the_extra(tmp_path):
    """With the tensorboard package hidden, the run stops before the first round with a message naming the extra."""
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tensorboard" or name.startswith("tensorboard."):
                    raise ImportError("No module named 'tensorboard' (hidden by the test)")
        sys.meta_path.insert(0, Hide())
        sys.path.insert(0, {str(tmp_path.parent)!r})
        import copy
        from mpi4py import MPI
        from qmlhfl_mpi import RunError, Session, load_config
        raw = {SMALL!r}
        raw["output"] = {{"path": {str(tmp_path / "tb.h5")!r}, "tensorboard": {str(tmp_path / "tb")!r}}}
        try:
            Session(load_config(raw), MPI.COMM_SELF).run()
        except RunError as e:
            print("CODE", e.code, "MSG", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "CODE 2" in proc.stdout, proc.stdout + proc.stderr
    assert "qmlhfl_mpi[tensorboard]" in proc.stdout and "output.tensorboard" in proc.stdout
    assert not (tmp_path / "tb.h5").exists()  # refused before anything was written: a rerun needs no --overwrite


def test_console_table_prints_a_row_per_round_with_elapsed_and_eta(tmp_path):
    out = io.StringIO()
    Session(config(tmp_path), self_comm()).run([ConsoleTable(out)])
    lines = out.getvalue().splitlines()
    assert lines[0].split()[-2:] == ["elapsed", "eta"]
    assert [ln.split()[0] for ln in lines[1:]] == ["0", "1", "2", "3"]
    assert lines[-1].split()[-1] == "0:00:00"  # nothing left after the last round


def test_config_callbacks_are_loaded_from_file_references(tmp_path):
    plugin = tmp_path / "cb.py"
    plugin.write_text(textwrap.dedent("""
        from qmlhfl_mpi import Callback
        class Stop(Callback):
            def __init__(self, at):
                self.at = at
            def on_round_end(self, session, record):
                return record["round"] == self.at
        class NotACallback:
            pass
    """))
    raw = copy.deepcopy(SMALL)
    raw["train"]["rounds"] = 4
    raw["output"] = {"path": str(tmp_path / "a.h5")}
    raw["callbacks"] = [{"ref": f"{plugin}:Stop", "args": {"at": 2}}]
    summary = Session(load_config(raw), self_comm()).run()
    assert summary.status == "preempted" and summary.rounds_done == 3
    raw["output"] = {"path": str(tmp_path / "b.h5")}
    raw["callbacks"] = [f"{plugin}:NotACallback"]
    with pytest.raises(RunError, match="NotACallback.*not a qmlhfl_mpi.Callback"):
        Session(load_config(raw), self_comm()).run()
    raw["output"] = {"path": str(tmp_path / "c.h5")}
    raw["callbacks"] = [{"ref": f"{plugin}:Stop", "args": {"when": 1}}]
    with pytest.raises(RunError, match="TypeError: .*unexpected keyword argument 'when'"):
        Session(load_config(raw), self_comm()).run()


def test_signal_stop_restores_handlers_unless_told_not_to(tmp_path):
    import signal

    from qmlhfl_mpi import SignalStop

    before = signal.getsignal(signal.SIGUSR1)
    keep = SignalStop(restore=False)
    Session(config(tmp_path), self_comm()).run([keep])
    assert signal.getsignal(signal.SIGUSR1) == keep._handle  # still caught after the run (the CLI's choice)
    signal.signal(signal.SIGUSR1, before)
    back = SignalStop()
    Session(config(tmp_path / "b"), self_comm()).run([back])
    assert signal.getsignal(signal.SIGUSR1) == before
