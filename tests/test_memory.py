"""The memory estimate: its terms, the largest sizes that fit, the tree counted without building it, the
config's sizing against a built run, and a run refused in process before anything is allocated."""
from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest

from helpers import SMALL
from qmlhfl_mpi import RunError, Session, load_config
from qmlhfl_mpi.config.sizing import available_memory, cgroup_room, check_memory, sizing
from qmlhfl_mpi.core.memory import (
    BASE_BYTES,
    MemoryEstimateError,
    Sizing,
    estimate_memory,
    fits,
    format_bytes,
    largest_tree,
    ranks_needed,
    with_devices,
)
from qmlhfl_mpi.core.topology import TopologyError, Tree, TreeShape

GiB = 1 << 30
S = Sizing(devices=10**6, nodes=1100, ranks=2, hosted=500_000, classes=10, params=8714, layers=3, sample_bytes=248,
           samples_per_device=226.6, message_buffers=10**6, state_vectors=4)


def test_the_estimate_is_the_sum_of_its_terms_and_grows_with_every_driver():
    est = estimate_memory(S)
    assert est.total == sum(t.bytes for t in est.terms) > BASE_BYTES
    assert est.dominant().driver == "devices per rank"
    for field, bigger in (("devices", 2 * 10**6), ("hosted", 10**6), ("params", 10**6), ("classes", 100),
                          ("samples_per_device", 1000.0), ("message_buffers", 10**8), ("state_vectors", 40)):
        assert estimate_memory(replace(S, **{field: bigger})).total > est.total, field
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(3 * GiB) == "3 GiB" and format_bytes(10) == "10 B"


def test_a_refusal_names_the_estimate_the_drivers_and_the_largest_sizes_that_fit():
    est = estimate_memory(S)
    assert fits(S, est.total, "test") is None
    msg = fits(S, 4 * GiB, "4 GiB by hand")
    assert msg is not None
    assert format_bytes(est.total) in msg and "4 GiB by hand" in msg and "devices on this rank" in msg
    most = largest_tree(S, 4 * GiB)
    assert f"at most {most:,} devices on 2 ranks" in msg
    need = ranks_needed(S, 4 * GiB)
    assert need is not None and f"at least {need:,} ranks" in msg


def test_largest_tree_and_ranks_needed_are_tight():
    budget = 3 * GiB
    most = largest_tree(S, budget)
    assert estimate_memory(with_devices(S, most)).total <= budget < estimate_memory(with_devices(S, most + 1)).total
    assert with_devices(S, most).hosted == -(-most // S.ranks)
    need = ranks_needed(S, budget)
    assert need is not None
    at = lambda p: replace(S, ranks=p, hosted=-(-S.devices // p))  # noqa: E731
    assert estimate_memory(at(need)).total <= budget < estimate_memory(at(need - 1)).total
    # a tree whose arrays over all devices alone are too much fits on no rank count
    huge = replace(S, devices=10**10, hosted=5 * 10**9)
    assert ranks_needed(huge, budget) is None
    assert "no rank count fits this tree" in fits(huge, budget, "x")


def random_spec(rng, depth):
    if depth == 1:
        return rng.randint(1, 5)
    return [random_spec(rng, depth - 1) for _ in range(rng.randint(1, 4))]


def test_the_tree_is_counted_without_building_it_exactly_as_built():
    rng = random.Random(3)
    for _ in range(40):
        spec = random_spec(rng, rng.randint(1, 4))
        tree, shape = Tree.from_nested(spec), TreeShape.of(None, spec)
        assert list(shape.nodes) == [tree.num_nodes(n) for n in range(tree.N + 1)]
        assert list(shape.max_children[1:]) == [max(len(tree.children(n, u)) for u in range(tree.num_nodes(n)))
                                                for n in range(1, tree.N + 1)]
    for b in ([3], [2, 5], [2, 2, 8]):
        tree, shape = Tree.uniform(b), TreeShape.of(b)
        assert list(shape.nodes) == [tree.num_nodes(n) for n in range(tree.N + 1)]
    assert TreeShape.of([10**5, 10**5]).devices == 10**10  # counted, not allocated
    for bad in ([[2], 3], [], [0], [[2], []]):
        with pytest.raises(TopologyError) as a:
            Tree.from_nested(bad)
        with pytest.raises(TopologyError) as b:
            TreeShape.of(None, bad)
        assert str(a.value) == str(b.value)


def config(tmp_path, **sections):
    raw = copy.deepcopy(SMALL)
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    raw["output"] = {"path": str(tmp_path / "run.h5")}
    return load_config(raw)


def test_the_sizing_from_the_config_matches_the_built_run(tmp_path):
    from mpi4py import MPI

    cfg = config(tmp_path, quantizer={"levels": [3, 8], "error_feedback": [True, False]},
                 server={"optimizer": ["avg", "adam"], "lr": [1.0, 0.01]})
    s = sizing(cfg, 1)
    session = Session(cfg, MPI.COMM_SELF)
    try:
        assert (s.devices, s.hosted, s.params, s.classes, s.layers) == \
            (session.tree.num_devices, len(session.devices), session.num_params, session.data.num_classes,
             session.tree.N)
        assert s.nodes == sum(session.tree.num_nodes(n) for n in range(1, session.tree.N + 1))
        # every device sends with error feedback on link 1 (6 residuals); the cloud keeps Adam's m and s
        assert s.state_vectors == 6 + 2
        assert s.message_buffers == 0  # one rank: nothing travels
    finally:
        session.close()
    assert sizing(cfg, 2).message_buffers == 2 * session.codecs[1].nbytes(s.params)  # the cloud spans 2 ranks


def test_a_run_over_its_memory_is_refused_in_process_before_anything_is_built(tmp_path):
    from mpi4py import MPI

    cfg = config(tmp_path, train={"memory_limit_gb": 0.5})  # below the interpreter's own share
    with pytest.raises(RunError) as info:
        Session(cfg, MPI.COMM_SELF)
    assert info.value.code == 2
    assert "needs an estimated" in str(info.value) and "train.memory_limit_gb = 0.5" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    off = config(tmp_path, train={"memory_limit_gb": 0.5, "memory_check": False})
    assert check_memory(off, 1, 1) is None
    with pytest.raises(MemoryEstimateError):
        check_memory(cfg, 1, 1)


def test_available_memory_is_shared_by_the_ranks_of_the_node():
    one, source = available_memory(1)
    four, _ = available_memory(4)
    assert four < one and ("MemAvailable" in source or "cgroup" in source)
    assert available_memory(1, limit_gb=2.5) == (int(2.5 * GiB), "train.memory_limit_gb = 2.5")


def test_the_tightest_cgroup_limit_above_the_process_counts(tmp_path):
    """A SLURM-like cgroup v2 hierarchy in files: the job's cgroup has the limit, the step's none."""
    root = tmp_path / "sys"
    step = root / "system.slice" / "slurmstepd.scope" / "job_42" / "step_0"
    step.mkdir(parents=True)
    (step / "memory.max").write_text("max\n")
    (step / "memory.current").write_text("100\n")
    (step.parent / "memory.max").write_text(str(8 * GiB))
    (step.parent / "memory.current").write_text(str(3 * GiB))
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/slurmstepd.scope/job_42/step_0\n")
    assert cgroup_room(root, proc) == 5 * GiB
    proc.write_text("4:memory:/process_api/x\n0::/\n")  # cgroup v1 memory controller, no limit anywhere
    assert cgroup_room(root, proc) is None
