"""Edge servers that fail (core/failures.py, pure) and the config sections ``mobility:`` and ``failures:``: each
rule, the tree of the moment they give, one clear error for each bad input."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import small_config
from qmlhfl_mpi import load_config
from qmlhfl_mpi.config import ConfigError, build
from qmlhfl_mpi.core.failures import EdgeFailures, Outage
from qmlhfl_mpi.core.membership import Membership
from qmlhfl_mpi.core.mobility import Mobility, Static
from qmlhfl_mpi.core.system import TraceError
from qmlhfl_mpi.core.topology import Tree

TREE = Tree.uniform([2, 3, 2])  # regions 0 (edges 0-2) and 1 (edges 3-5), two devices per edge
PARENT = np.array([0, 0, 0, 1, 1, 1])
OWN = Membership.of_tree(TREE).edge_of


def failures(*outages: Outage, **kw: str) -> EdgeFailures:
    return EdgeFailures(list(outages), 6, PARENT, **kw)


def test_devices_of_a_down_edge_join_the_nearest_alive_sibling_for_the_interval_only():
    f = failures(Outage(1, 2, 4))
    assert f.apply(OWN, 1, 0.0) is OWN  # nothing down: the same array
    moved = f.apply(OWN, 2, 0.0)
    assert moved[[2, 3]].tolist() == [0, 0]  # edges 0 and 2 are both one away: the lower id
    assert np.array_equal(np.delete(moved, [2, 3]), np.delete(OWN, [2, 3]))
    assert f.apply(OWN, 4, 0.0) is OWN  # recovered: its devices are back
    both = failures(Outage(0, 0, 1), Outage(1, 0, 1))
    assert both.apply(OWN, 0, 0.0)[[0, 1, 2, 3]].tolist() == [2, 2, 2, 2]  # the only alive sibling
    region = failures(Outage(3, 0, 1), Outage(4, 0, 1), Outage(5, 0, 1))
    assert (region.apply(OWN, 0, 0.0)[6:] == -1).all()  # no alive sibling in the region: they sit out


def test_named_fallbacks_sit_out_and_seconds():
    f = failures(Outage(0, 0, 2, fallback=5), Outage(4, 0, 2, fallback=-1))
    got = f.apply(OWN, 0, 0.0)
    assert got[[0, 1]].tolist() == [5, 5] and got[[8, 9]].tolist() == [-1, -1]
    chain = failures(Outage(0, 0, 1, fallback=5), Outage(5, 0, 1))  # the named one is down too: its nearest
    assert chain.apply(OWN, 0, 0.0)[[0, 1, 10, 11]].tolist() == [4, 4, 4, 4]
    out = failures(Outage(2, 0, 1), fallback="sit_out")
    assert out.apply(OWN, 0, 0.0)[[4, 5]].tolist() == [-1, -1]
    secs = failures(Outage(2, 1.5, 2.5), unit="seconds")
    assert secs.apply(OWN, 7, 1.0) is OWN and secs.apply(OWN, 0, 1.5)[4] == 1 and secs.apply(OWN, 0, 2.5) is OWN


def test_mobility_with_failures_is_a_view_that_leaves_the_moves_alone():
    mob = Mobility(TREE, Static(), failures(Outage(1, 1, 2)))
    assert mob.dynamic and not Mobility(TREE, Static(), failures()).dynamic
    assert mob.at(0).moved(TREE).size == 0
    m = mob.at(1)
    assert m.moved(TREE).tolist() == [2, 3] and m.members(1).size == 0 and m.members(0).tolist() == [0, 1, 2, 3]
    assert mob.at(2).moved(TREE).size == 0


@pytest.mark.parametrize("outage, message", [
    (Outage(6, 0, 1), "edge server 6 out of range"), (Outage(0, 2, 1), "expected 0 <= start < end"),
    (Outage(0, 0, 1, fallback=7), "fallback 7 of edge server 0 out of range"),
    (Outage(0, 0, 1, fallback=0), "cannot be its own fallback")])
def test_bad_outages(outage, message):
    with pytest.raises(ValueError, match=message):
        failures(outage)


@pytest.mark.parametrize("sections, message", [
    ({"failures": {"intervals": [[2, 0, 1]]}}, r"edge server 2 out of range; the tree has 2 edge servers \(0..1\)"),
    ({"failures": {"intervals": [[0, 3, 1]]}}, r"failures.intervals\[0\]' = \[0, 3, 1\]: expected \[edge, start, end\]"),
    ({"failures": {"intervals": [[0, 0, 1, 0]]}}, "fallback 0 must be another edge server"),
    ({"failures": {"intervals": "0-3"}}, "expected a list of"),
    ({"failures": {"unit": "hours"}}, "failures.unit"),
    ({"mobility": {"model": "random"}}, "nobody would move"),
    ({"mobility": {"model": "markov"}}, "the markov model needs its file"),
    ({"mobility": {"model": "random", "p": 0.5, "trace": "t.csv"}}, "only the trace model reads it"),
    ({"mobility": {"model": "teleport"}}, "mobility.model"),
    ({"mobility": {"p": 1.5}}, "mobility.p"),
])
def test_bad_sections_are_refused_naming_the_key(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        load_config(small_config(tmp_path, **sections))


def test_the_files_are_read_and_their_errors_name_the_key(tmp_path):
    tree = Tree.uniform([2, 3])
    def built(**sections):
        return build.mobility(load_config(small_config(tmp_path, **sections)), tree)
    (tmp_path / "m.txt").write_text("0.5, 0.5\n1 0\n")
    assert built(mobility={"model": "markov", "matrix": str(tmp_path / "m.txt")}).dynamic
    (tmp_path / "bad.txt").write_text("0.5 0.4\n1 0\n")
    with pytest.raises(ConfigError, match=r"mobility.matrix.*row 0 sums to 0.9"):
        built(mobility={"model": "markov", "matrix": str(tmp_path / "bad.txt")})
    (tmp_path / "three.txt").write_text("1 0 0\n0 1 0\n0 0 1\n")
    with pytest.raises(ConfigError, match="3 rows but the tree has 2 edge servers"):
        built(mobility={"model": "markov", "matrix": str(tmp_path / "three.txt")})
    with pytest.raises(TraceError, match="mobility.matrix.*cannot be read"):
        built(mobility={"model": "markov", "matrix": str(tmp_path / "none.txt")})
    (tmp_path / "t.csv").write_text("round,device,edge\n1,9,0\n")
    with pytest.raises(ConfigError, match=r"mobility.trace.*device 9 out of range \(valid: 0..5\)"):
        built(mobility={"model": "trace", "trace": str(tmp_path / "t.csv")})
    (tmp_path / "f.csv").write_text("edge,start,end,fallback\n0,1,2,\n1,0,1,-1\n")
    mob = built(failures={"trace": str(tmp_path / "f.csv"), "intervals": [[1, 5, 6]]})
    assert mob.at(0).members(1).size == 0 and mob.at(1).members(1).tolist() == [0, 1, 2, 3, 4, 5]
    (tmp_path / "g.csv").write_text("edge,start,end\n4,1,2\n")
    with pytest.raises(ConfigError, match=r"failures.trace \(.*g.csv\)\[0\].*edge server 4 out of range"):
        built(failures={"trace": str(tmp_path / "g.csv")})


@pytest.mark.portable
def test_the_mobility_example_under_mpiexec_sigkilled_resumes_and_records_its_trees(tmp_path, capsys):
    """configs/examples/mobility.yaml on 2 ranks, rank 1 SIGKILLed in round 3 (the checkpoint holds rounds 0-2),
    resumed on 1 rank (in this process): the model, metrics and recorded trees of an uninterrupted run. Edge server
    2 is down in rounds 3-5, so its devices sit under edge 1 (its nearest alive sibling) then and nothing arrives
    from it; devices move on a ring every round; ``check`` says which assumptions of the bound no longer hold."""
    import h5py
    from mpi4py import MPI

    from helpers import REPO, killed_run, wait_until_released
    from qmlhfl_mpi import Session
    from qmlhfl_mpi.cli import main

    example = str(REPO / "configs/examples/mobility.yaml")
    sets = ["train.rounds=5", "train.eval_every=5"]
    out = tmp_path / "mobility.h5"
    killed_run(2, REPO / "configs/examples/mobility.yaml", out, *sets, round_=3)
    wait_until_released(tmp_path / "mobility.h5.lock")
    Session(load_config(example, [*sets, f"output.path={out}"]), MPI.COMM_SELF).run(resume=True)
    Session(load_config(example, [*sets, f"output.path={tmp_path / 'whole.h5'}"]), MPI.COMM_SELF).run()
    with h5py.File(out) as f, h5py.File(tmp_path / "whole.h5") as g:
        rows, messages = f["topology/parents"][()], f["metrics/messages"][()]
        starts = f["topology/starts_1"][()]
        assert f.attrs["resumed_at_rounds"].tolist() == [3]
        assert np.array_equal(f["model/final"][()], g["model/final"][()])
        assert np.array_equal(rows, g["topology/parents"][()])
        for key in ("messages", "uplink_bytes", "downlink_bytes", "virtual_time", "train_loss"):
            assert np.array_equal(f["metrics"][key][()], g["metrics"][key][()]), key
    edges = np.repeat(np.arange(6), np.diff(starts))
    for t in range(5):
        mine = rows[rows[:, 0] == t]
        if t >= 1:
            assert 0 < len(mine) < 48, t  # p = 0.2 of 48 devices move (and, in round 3, edge 2's join edge 1)
        edges = edges.copy()
        edges[mine[:, 1]] = mine[:, 2]
        assert (edges == 2).any() == (t < 3), t
        assert messages[t, 0] == 2 * 48 and messages[t, 1] == 6 - (t >= 3)  # tau_2 = 2 local runs of everyone
    assert main(["check", example, "--L", "1"]) == 0
    said = capsys.readouterr().out
    assert "devices that move (mobility.model random" in said and "edge servers that fail" in said


def test_a_trace_changed_between_checkpoint_and_resume_is_refused_naming_it(tmp_path):
    """The checkpoint keeps the SHA-256 of every trace and matrix file the run reads (covered by its own
    digest); --resume with a changed file is refused, naming the key and the file, and nothing is changed;
    with the file restored it resumes."""
    import h5py
    from mpi4py import MPI

    from qmlhfl_mpi import Callback, Session
    from qmlhfl_mpi.run.errors import RunError

    class StopAfter(Callback):
        def on_round_end(self, session, record):
            return int(record["round"]) == 0

    trace = tmp_path / "moves.csv"
    trace.write_text("round,device,edge\n1,0,1\n2,3,0\n")
    cfg = small_config(tmp_path, mobility={"model": "trace", "trace": str(trace)}, train={"rounds": 3})
    Session(load_config(cfg), MPI.COMM_SELF).run(callbacks=[StopAfter()])
    ckpt = tmp_path / "out.h5.ckpt"
    with h5py.File(ckpt) as f:
        assert "mobility.trace" in f.attrs["inputs"]
    before = ckpt.read_bytes()
    trace.write_text("round,device,edge\n1,0,1\n2,4,0\n")  # another device moves in round 2
    with pytest.raises(RunError, match=r"the file '.*moves.csv' of config key 'mobility.trace' changed since the "
                                       r"checkpoint"):
        Session(load_config(cfg), MPI.COMM_SELF).run(resume=True)
    assert ckpt.read_bytes() == before
    trace.write_text("round,device,edge\n1,0,1\n2,3,0\n")
    assert Session(load_config(cfg), MPI.COMM_SELF).run(resume=True).status == "completed"
