"""The engine on 1, 2, 3 and 4 ranks in one ``mpiexec``: every configuration runs in process on
sub-communicators of ``COMM_WORLD`` (1, 2 and 4 ranks, and 3 where the nodes span ranks unevenly, with the
device backend), and gives the same model and the same metrics (bytes, messages and test metrics included)
on every size; the unbatched ones equal the independent serial
reference (tests/reference.py) bit for bit, with the host and the device aggregation backends; a run
stopped after a checkpoint resumes on another rank count to the same end.

Run by tests/test_pytest_mpi.py under ``mpiexec -n 4``; with fewer ranks it is skipped (the 4-rank run
covers every smaller size).
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from helpers import EVERYTHING, SMALL
from qmlhfl_mpi import Callback, Session, load_config
from qmlhfl_mpi.core.topology import RankLayout, TopologyError
from reference import reference_for

WORLD = MPI.COMM_WORLD
METRICS = ("uplink_bytes", "messages", "downlink_bytes", "train_loss", "test_loss", "test_accuracy", "virtual_time",
           "dropped", "offline", "link_busy", "critical_path", "finish_time", "epsilon", "clip", "unclipped_fraction")
FMNIST = "/usr/share/datasets/fashion-mnist"




def raw_config(out: Path, **sections: Any) -> dict[str, Any]:
    raw = copy.deepcopy(SMALL)
    for key, val in sections.items():
        raw[key] = {**raw[key], **val} if isinstance(val, dict) and isinstance(raw.get(key), dict) \
            and key != "topology" else val
    raw["output"] = {"path": str(out)}
    return raw


class StopAfter(Callback):
    def __init__(self, k: int) -> None:
        self.k = k

    def on_round_end(self, session: Any, record: Any) -> bool:
        return int(record["round"]) == self.k


def on(k: int, raw: dict[str, Any], out: Path, **run: Any) -> None:
    """Run ``raw`` into ``out`` on the first ``k`` ranks of COMM_WORLD (the others wait).  Collective."""
    sub = WORLD.Split(0 if WORLD.rank < k else MPI.UNDEFINED, WORLD.rank)
    if sub != MPI.COMM_NULL:
        cfg = load_config({**raw, "output": {**raw["output"], "path": str(out)}})
        Session(cfg, sub).run(**run)
        sub.Free()
    sleepy_barrier()


def sleepy_barrier() -> None:
    """A barrier that sleeps between tests of its request: MPICH busy-polls in ``Barrier``, so the ranks left out
    of a smaller run would take the cores its ranks need (2 cores here)."""
    req = WORLD.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def read(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "completed", (path, f.attrs["status"])
        return f["model/final"][()], {k: f["metrics"][k][()] for k in METRICS}, int(f.attrs["world_size"])


def sizes_for(raw: dict[str, Any], wanted: tuple[int, ...]) -> list[int]:
    """The sizes of ``wanted`` this tree can be laid out on."""
    tree = load_config(raw).build_tree()
    out = []
    for k in wanted:
        try:
            RankLayout.build(tree, k)
            out.append(k)
        except TopologyError:
            pass
    return out


def same_on_every_size(tmp: Path, name: str, raw: dict[str, Any], sizes: tuple[int, ...] = (1, 2, 4),
                       **variants: dict[str, Any]) -> dict[str, Any]:
    """Run ``raw`` on each size (1, 2 and 4 ranks by default) and each variant of its train section on 3 ranks,
    where the nodes span ranks unevenly (3 without a variant); on rank 0 assert that all give the first run's
    model and metrics, and return those."""
    runs = []
    for k in sizes_for(raw, sizes if variants else tuple(sorted({*sizes, 3}))):
        runs.append((f"{name} on {k}", k, raw))
    for vname, train in variants.items():
        vraw = {**raw, "train": {**raw["train"], **train}}
        runs += [(f"{name} {vname} on {k}", k, vraw) for k in sizes_for(vraw, (3,))]
    results = {}
    for i, (label, k, r) in enumerate(runs):
        out = tmp / f"{name}-{i}.h5"
        on(k, r, out)
        if WORLD.rank == 0:
            results[label] = read(out)
    if WORLD.rank != 0:
        return {}
    assert len(results) >= 3, list(results)  # at least two sizes and a variant, or three sizes
    first_label, (model0, metrics0, _) = next(iter(results.items()))
    assert np.isfinite(model0).all(), first_label
    for label, (model, metrics, world) in results.items():
        assert world == int(label.rsplit(" on ", 1)[1]), label
        assert np.array_equal(model, model0), f"{label} differs from {first_label}"
        for key in METRICS:
            assert np.array_equal(metrics[key], metrics0[key], equal_nan=True), (label, key)
    return {"model": model0, "metrics": metrics0}


AVAILABILITY = "availability.csv"  # written into the test's directory: device 1 online at first, device 4 late


MATRIX = "moves.txt"  # a Markov matrix over 3 edges: mostly stay, edge 2 sends half of its devices to edge 0
FILES = {AVAILABILITY: "device,online,offline\n1,0,0.05\n4,0.02,10\n",
         MATRIX: "# from edge i (row) to edge j\n0.7 0.2 0.1\n0.1, 0.8, 0.1\n0.5 0 0.5\n"}


def with_traces(sections: dict[str, Any], where: Path) -> dict[str, Any]:
    """``sections`` with the trace files they name written under ``where`` (by rank 0) and their paths filled
    in."""
    out = dict(sections)
    for section, key in (("system", "availability_trace"), ("mobility", "matrix")):
        name = sections.get(section, {}).get(key)
        if name in FILES:
            if WORLD.rank == 0:
                (where / name).write_text(FILES[name])
            out[section] = {**sections[section], key: str(where / name)}
    WORLD.Barrier()
    return out


# the serial reference's arithmetic is the unbatched path's: these run with vectorize off
REFERENCE_CASES = {
    "N1-fedavg": dict(topology={"tree": 5}, tau=[3], quantizer={"levels": [4], "bucket": 16}),
    "N2-hier-local-qsgd-validation": dict(topology={"branching": [2, 3]}, tau=[2, 3],
                                          quantizer={"levels": [3, 0], "bucket": 0}, data={"validation": 0.25}),
    "N3": dict(topology={"branching": [2, 2, 2]}, tau=[2, 2, 2], quantizer={"levels": [2, 6, 16], "bucket": 8}),
    "N3-unbalanced": dict(topology={"tree": [[3, 1], [2]]}, tau=[1, 2, 2],
                          quantizer={"levels": [4, 8, 2], "bucket": 16}),
    "N2-unbalanced-samples": dict(topology={"tree": [4, 1, 2], "weighting": "samples"}, tau=[2, 2],
                                  quantizer={"levels": [5, 3], "bucket": 16}),
    "N1-sampling-renormalize": dict(topology={"tree": 6}, tau=[2], quantizer={"levels": [4], "bucket": 16},
                                    participation={"fraction": [0.5]}),
    "N2-sampling-unbiased-availability": dict(
        topology={"branching": [2, 3]}, tau=[2, 2], quantizer={"levels": [3, 8], "bucket": 16},
        participation={"fraction": [0.67, 1.0], "availability": [0.7, 1.0], "weighting": "unbiased"}),
    "N3-server-optimizers-downlink": dict(
        topology={"branching": [2, 2, 2]}, tau=[2, 2, 1],
        quantizer={"levels": [2, 6, 16], "bucket": 8, "downlink": [8, 0, 16]},
        server={"optimizer": ["momentum", "avg", "adam"], "lr": [1.0, 1.0, 0.05], "momentum": [0.5, 0.9, 0.9]}),
    "N3-unbalanced-everything": dict(
        topology={"tree": [[3, 1], [2]]}, tau=[1, 2, 2],
        quantizer={"levels": [4, 8, 2], "bucket": 16, "kind": ["topk", "sign", "qsgd"],
                   "topk_fraction": [0.2, 0.01, 0.01], "error_feedback": [True, True, False], "downlink": [0, 4, 8]},
        participation={"fraction": [0.5, 1.0, 1.0], "availability": [1.0, 0.8, 1.0]},
        server={"optimizer": ["avg", "yogi", "momentum"], "betas": [0.8, 0.95]},
        train={"momentum": 0.9, "prox_mu": 0.1, "lr_schedule": "step", "lr_step_rounds": 1, "lr_gamma": 0.5}),
    "N2-samples-round-tensor-client": dict(
        topology={"tree": [4, 1, 2], "weighting": "samples"}, tau=[2, 2],
        quantizer={"levels": [5, 3], "bucket": "tensor", "kind": ["round", "qsgd"]},
        participation={"fraction": [0.5, 1.0], "weighting": "unbiased"},
        train={"momentum": 0.5, "nesterov": True, "weight_decay": 0.01, "lr_schedule": "cosine"}),
    # the virtual clock (docs/system.md): stragglers dropped at a deadline, over-selection at the cloud
    "N2-clock-deadline-first_k": dict(
        topology={"branching": [2, 3]}, tau=[2, 2], quantizer={"levels": [3, 8], "bucket": 16},
        participation={"fraction": [0.67, 1.0]},
        system={"speed": "lognormal(1)", "jitter": "lognormal(0.3)", "seed": 3},  # the network's own seed
        aggregation={"policy": ["deadline", "first_k"], "deadline": [0.05, 0], "k": [0, 1]}),
    # availability in time, downlink times, a deadline some nodes miss entirely (they keep their model)
    "N3-clock-availability-downlink": dict(
        topology={"tree": [[3, 1], [2]]}, tau=[1, 2, 2],
        quantizer={"levels": [4, 8, 2], "bucket": 16, "downlink": [0, 4, 8]}, participation={"fraction": [0.7, 1, 1]},
        system={"speed": "lognormal(0.5)", "down_rate": [1e6, 0, 1e7], "down_latency": [0.01, 0, 0.002],
                "availability_trace": AVAILABILITY},
        aggregation={"policy": ["all", "deadline", "first_k"], "deadline": [0, 0.075, 0], "min_children": [1, 0, 1],
                     "k": [1, 1, 1]}),
    # the tree of the moment (docs/algorithms.md): every device moves every round; an edge server down in round 1
    # (its devices join the nearest alive sibling) and one down from the start (they sit out)
    "N3-mobility-every-device-moves-failures": dict(
        topology={"branching": [2, 3, 2]}, tau=[1, 2, 1],
        quantizer={"levels": [3, 8, 16], "bucket": 8, "error_feedback": [True, True, False], "downlink": [4, 0, 0]},
        participation={"fraction": [0.67, 1, 1]}, server={"optimizer": ["avg", "momentum", "avg"]},
        mobility={"model": "random", "p": 1.0}, failures={"intervals": [[1, 1, 2], [3, 0, 2, -1]]}),
    # Markov moves on the clock: failures counted in virtual seconds, a deadline, samples weighting
    "N2-markov-clock-failures-in-seconds": dict(
        topology={"branching": [3, 3], "weighting": "samples"}, tau=[2, 2], quantizer={"levels": [3, 8], "bucket": 16},
        system={"speed": "lognormal(1)"}, aggregation={"policy": ["deadline", "all"], "deadline": [0.06, 0]},
        mobility={"model": "markov", "matrix": MATRIX}, failures={"intervals": [[0, 0.05, 0.3]], "unit": "seconds"}),
    # a ring of edges, sampling at the edges, and an outage whose devices sit out
    "N2-ring-unbiased-sit-out": dict(
        topology={"branching": [3, 3]}, tau=[2, 1], quantizer={"levels": [5, 4], "bucket": 16},
        participation={"fraction": [0.5, 1.0], "weighting": "unbiased"},
        mobility={"model": "random", "p": 0.4, "neighbours": "ring", "seed": 3},
        failures={"intervals": [[2, 1, 3]], "fallback": "sit_out"}),
    # buffered layers 2..4 (docs/algorithms.md, "Buffered layers") over edges with a deadline (stragglers dropped
    # inside each job) and edge sampling: error feedback and momentum on the buffered links, Adam at the cloud,
    # stale updates discounted, downlinks that take time; the checkpoint after round 1 holds buffers, messages
    # in flight and the buffered nodes' models (resumed on another rank count below)
    "N4-buffered-layers-over-deadline-edges": dict(
        topology={"tree": [[[2, 3], [2]], [[1, 2], [3, 1]]]}, tau=[2, 1, 2, 1],
        quantizer={"levels": [3, 8, 8, 8], "bucket": 16, "error_feedback": [False, True, True, False]},
        server={"optimizer": ["avg", "momentum", "avg", "adam"], "lr": [1.0, 1.0, 1.0, 0.05]},
        participation={"fraction": [0.6, 1, 1, 1]}, system={"speed": "lognormal(1)", "down_rate": [0, 1e6, 1e6, 1e6]},
        aggregation={"policy": ["deadline", "buffered", "buffered", "buffered"], "deadline": [0.03, 0, 0, 0],
                     "buffer": [0, 1, 2, 1], "staleness": ["constant", "polynomial(0.5)", "hinge(1, 1)", "constant"]}),
    # central differential privacy (docs/privacy.md) on an unequal tree: clipped device updates, edges that sample
    # and drop stragglers, unbiased weights, the cloud's noise scaled to its largest device weight, a clip that
    # adapts to the median update norm (stopped and resumed on another rank count below)
    "N2-dp-central-adaptive-clip-over-deadline-edges": dict(
        topology={"tree": [3, 4, 2]}, tau=[2, 1], quantizer={"levels": [4, 0], "bucket": 16},
        participation={"fraction": [0.7, 1.0], "weighting": "unbiased"}, system={"speed": "lognormal(1)"},
        aggregation={"policy": ["deadline", "all"], "deadline": [0.03, 0]},
        privacy={"clip": 0.05, "noise_multiplier": 1.5, "placement": "central", "clip_quantile": 0.5,
                 "clip_lr": 0.5}),
    # secure aggregation at the edges (docs/privacy.md): intsum codes with the devices' discrete Gaussian shares
    # (distributed DP), rotated, masked pairwise across ranks (an edge's devices split over ranks), stragglers
    # dropped inside key groups, groups of fewer than 2 survivors aborted
    "N2-secagg-distributed-dp-dropouts": dict(
        topology={"branching": [2, 5]}, tau=[2, 2], participation={"fraction": [0.8, 1]},
        quantizer={"levels": [20, 8], "bucket": 16, "kind": ["intsum", "qsgd"], "rotate": [True, False]},
        system={"speed": "lognormal(1)"}, aggregation={"policy": ["deadline", "all"], "deadline": [0.03, 0]},
        privacy={"clip": 0.5, "noise_multiplier": 0.8, "placement": "distributed", "secure_aggregation": [True, False],
                 "secure_threshold": 2}),
    # ADMM at the edges (docs/algorithms.md): a dual per device on the rank that trains it, edges that sample,
    # error feedback on the device link, momentum in the local solves (stopped and resumed on another rank count)
    "N3-admm-edges-sampled": dict(
        topology={"tree": [[3, 2], [4]]}, tau=[2, 2, 1], participation={"fraction": [0.7, 1, 1]},
        quantizer={"levels": [4, 8, 0], "bucket": 16, "error_feedback": [True, False, False]},
        train={"momentum": 0.5}, admm={"layer": 1, "rho": 0.3}),
    # ADMM at the regional servers: the edges' subtrees train toward their anchors; edge 0 (6 devices) spans
    # ranks 0 and 1 on 3 and 4 ranks, so its anchor is broadcast over its subtree
    "N3-admm-regions-spanning": dict(
        topology={"tree": [[6], [2, 2]]}, tau=[2, 2, 1], participation={"fraction": [0.67, 0.5, 1]},
        quantizer={"levels": [4, 8, 0], "bucket": 16, "error_feedback": [False, True, False]},
        admm={"layer": 2, "rho": 0.3}),
    # (speeds so spread that a fast device's message is twice in one buffer of 3, in rounds 0-2)
    "N1-fedbuff-hinge": dict(
        topology={"tree": 6}, tau=[3], quantizer={"levels": [4], "bucket": 16},
        system={"speed": "lognormal(1.5)", "jitter": "lognormal(0.3)"},
        aggregation={"policy": ["buffered"], "buffer": [3], "staleness": ["hinge(1, 1)"]}),
}


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_every_size_and_both_backends_equal_the_serial_reference(mpi_tmp_path, case):
    sections = with_traces(copy.deepcopy(REFERENCE_CASES[case]), mpi_tmp_path)
    sections["train"] = {"rounds": 3, "vectorize": "off", "aggregate_on": "host", **sections.get("train", {})}
    raw = raw_config(mpi_tmp_path / "x.h5", **sections)
    got = same_on_every_size(mpi_tmp_path, case, raw, device={"aggregate_on": "device"})
    if WORLD.rank == 0:
        ref = reference_for(load_config(raw))
        expected = ref.run(raw["train"]["rounds"])
        assert np.isfinite(expected).all()
        assert np.array_equal(got["model"], expected), f"max abs diff {np.abs(got['model'] - expected).max()}"
        if ref.clock is not None:  # the reference's plain-loop clock gives the same virtual time, bit for bit
            assert got["metrics"]["virtual_time"][-1] == ref.virtual_time
            if {"deadline", "first_k"} & set(raw.get("aggregation", {}).get("policy", [])):
                assert got["metrics"]["dropped"].sum() > 0
        if case == "N1-fedbuff-hinge":  # the premise: some buffer holds one device's message twice
            from itertools import islice

            from qmlhfl_mpi.analysis.clockfit import ClockModel
            from qmlhfl_mpi.config.build import model_dim
            from qmlhfl_mpi.core.tiers import FLUSH
            cfg = load_config(raw)
            sched = ClockModel(cfg, cfg.build_tree(), model_dim(cfg)).scheduler(cfg.tau).schedule()
            flushes = [[c for c, _ in e.entries] for events in islice(sched.rounds(), 3) for e in events
                       if e.kind == FLUSH]
            assert any(len(set(f)) < len(f) for f in flushes), flushes
    if "buffered-layers" in case or "adaptive-clip" in case or "admm" in case:  # stopped after round 1 on 3
        # ranks, resumed on 2
        out = mpi_tmp_path / "resumed.h5"
        on(3, raw, out, callbacks=[StopAfter(1)])
        if WORLD.rank == 0 and ("buffered-layers" in case or "admm" in case):
            with h5py.File(str(out) + ".ckpt", "r") as f:
                kinds = {k.split(".")[0] for k in f["state"]}
                assert ({"dual"} if "admm" in case else {"tier", "held", "buffer"}) <= kinds, sorted(f["state"])
        on(2, raw, out, resume=True)
        if WORLD.rank == 0:
            model, metrics, _ = read(out)
            assert np.array_equal(model, got["model"])
            for key in METRICS:
                assert np.array_equal(metrics[key], got["metrics"][key], equal_nan=True), key
    if WORLD.rank == 0:
        if ref.moves is not None:  # the recorded trees are the reference's trees of the moment
            assert recorded_trees(mpi_tmp_path / f"{case}-0.h5", raw["train"]["rounds"]) == ref.parents
            if "every-device-moves" in case:
                assert (np.array(ref.parents) != np.array(ref.moves.edges_of_tree)).any(axis=0).all()


def recorded_trees(path: Path, rounds: int) -> list[list[int]]:
    """Every device's edge in every round, from the file's ``/topology/parents`` change rows."""
    with h5py.File(path, "r") as f:
        edges = np.repeat(np.arange(len(f["topology/starts_1"]) - 1), np.diff(f["topology/starts_1"][()]))
        rows = f["topology/parents"][()]
    out = []
    for t in range(rounds):
        mine = rows[rows[:, 0] == t]
        edges = edges.copy()
        edges[mine[:, 1]] = mine[:, 2]
        out.append(edges.tolist())
    return out


@pytest.mark.mpi(min_size=4)
def test_the_recorded_trees_replayed_as_a_trace_give_the_same_run(mpi_tmp_path):
    """A mobility run's ``/topology/parents`` is a mobility trace: run again from it (its failures then recorded
    as devices sitting out), on 1 and 3 ranks, it gives the same model, bytes and messages; so does the run
    stopped on 2 ranks and resumed on 3, whose file records the same trees."""
    sections = copy.deepcopy(REFERENCE_CASES["N3-mobility-every-device-moves-failures"])
    sections["train"] = {"rounds": 3, "vectorize": "off"}
    raw = raw_config(mpi_tmp_path / "x.h5", **sections)
    on(4, raw, mpi_tmp_path / "moving.h5")
    trace = mpi_tmp_path / "parents.csv"
    rows = None
    if WORLD.rank == 0:
        with h5py.File(mpi_tmp_path / "moving.h5", "r") as f:
            rows = f["topology/parents"][()]
        trace.write_text("round,device,edge\n" + "".join(f"{r},{d},{e}\n" for r, d, e in rows.tolist()))
    WORLD.Barrier()
    again = {**raw, "mobility": {"model": "trace", "trace": str(trace)}, "failures": {}}
    for k in (1, 3):
        on(k, again, mpi_tmp_path / f"replayed-{k}.h5")
    # stopped after round 1 on 2 ranks, resumed on 3: the same model and the same recorded trees
    on(2, raw, mpi_tmp_path / "resumed.h5", callbacks=[StopAfter(1)])
    on(3, raw, mpi_tmp_path / "resumed.h5", resume=True)
    if WORLD.rank == 0:
        model, metrics, _ = read(mpi_tmp_path / "moving.h5")
        for name in ("replayed-1", "replayed-3", "resumed"):
            model_k, metrics_k, _ = read(mpi_tmp_path / f"{name}.h5")
            assert np.array_equal(model_k, model), name
            for key in ("uplink_bytes", "messages", "downlink_bytes", "train_loss"):
                assert np.array_equal(metrics_k[key], metrics[key]), (name, key)
        with h5py.File(mpi_tmp_path / "resumed.h5", "r") as f:
            assert np.array_equal(f["topology/parents"][()], rows)
            assert f.attrs["resumed_at_rounds"].tolist() == [2]


EVERYTHING_RUN = dict(EVERYTHING, train={"rounds": 6, "momentum": 0.9, "vectorize": "off", "aggregate_on": "host"})


@pytest.mark.mpi(min_size=4)
def test_everything_on_is_rank_invariant_and_resumes_on_other_rank_counts(mpi_tmp_path):
    raw = raw_config(mpi_tmp_path / "x.h5", **copy.deepcopy(EVERYTHING_RUN))
    got = same_on_every_size(mpi_tmp_path, "everything", raw, device={"aggregate_on": "device"})
    # stopped after round 2 on 2 ranks (server state and residuals in the checkpoint), resumed on 3 (host) and,
    # from a run stopped on 4 ranks on the device backend, resumed on 1: both end where the uninterrupted run ends
    for first, then, backend in ((2, 3, "host"), (4, 1, "device")):
        vraw = {**raw, "train": {**raw["train"], "aggregate_on": backend}}
        out = mpi_tmp_path / f"resumed-{first}-{then}.h5"
        on(first, vraw, out, callbacks=[StopAfter(2)])
        if WORLD.rank == 0:
            with h5py.File(str(out) + ".ckpt", "r") as f:
                state = sorted(f["state"])
                assert int(f.attrs["rounds_done"]) == 3
            assert any(k.startswith("server.1.") for k in state) and any(k.startswith("server.3.") for k in state)
            assert any(k.startswith("residual.1.") for k in state) and any(k.startswith("residual.2.") for k in state)
        on(then, vraw, out, resume=True)
        if WORLD.rank == 0:
            model, metrics, _ = read(out)
            assert np.array_equal(model, got["model"]), (first, then, backend)
            for key in METRICS:
                assert np.array_equal(metrics[key], got["metrics"][key], equal_nan=True), (first, then, key)


BATCHED = {
    # edges of 4 devices split over ranks (3 and 4 ranks), so the batches differ with the rank count
    "vectorize-on": dict(topology={"branching": [2, 4]}, tau=[3, 2], quantizer={"levels": [4, 16], "bucket": 8},
                         train={"rounds": 3, "vectorize": "on"}),
    "vectorize-options": dict(
        topology={"tree": [[5, 3], [4]]}, tau=[3, 2, 1],
        quantizer={"levels": [8, 8, 16], "bucket": 16, "error_feedback": [True, False, False], "downlink": [0, 0, 8]},
        participation={"fraction": [0.7, 1.0, 1.0]}, server={"optimizer": ["avg", "momentum", "avg"]},
        train={"rounds": 3, "vectorize": "on", "momentum": 0.9, "weight_decay": 1e-3, "lr_schedule": "cosine"}),
    # cross-device: 4 of an edge's 40 devices drawn, spread over the ranks the edge spans; batches follow the
    # draw; a cache too small for one device (every device made again when drawn) and a test set of 8 devices
    "vectorize-sampling-lazy": dict(
        topology={"branching": [2, 40]}, tau=[3, 2], quantizer={"levels": [4, 16], "bucket": 8},
        participation={"fraction": [0.1, 1.0]}, data={"cache_mb": 0.001, "test_devices": 8},
        train={"rounds": 3, "vectorize": "on"}),
}


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("case", sorted(BATCHED))
def test_batched_training_is_rank_invariant_on_both_backends(mpi_tmp_path, case):
    raw = raw_config(mpi_tmp_path / "x.h5", **copy.deepcopy(BATCHED[case]))
    got = same_on_every_size(mpi_tmp_path, case, raw, device={"aggregate_on": "device"})
    if WORLD.rank == 0:
        assert got["model"].size > 0
        tables = []
        for path in sorted(mpi_tmp_path.glob(f"{case}-*.h5")):
            with h5py.File(path, "r") as f:
                tables.append(f["topology/class_counts"][()])
        assert all(np.array_equal(t, tables[0]) for t in tables), case  # the same devices made on any size
        if case == "vectorize-sampling-lazy":  # devices never drawn are never made: their rows are -1
            made = (tables[0] >= 0).all(axis=1)
            assert 0 < made.sum() < 80 and (tables[0][~made] == -1).all()


@pytest.mark.mpi(min_size=4)
def test_fashion_mnist_is_rank_invariant_including_the_test_metrics(mpi_tmp_path):
    """Real images: the partition, each rank's data and the chunked evaluation give the same model and the same
    metrics on every size."""
    if not os.path.isdir(FMNIST):
        pytest.skip(f"{FMNIST} missing: apt-get install dataset-fashion-mnist")
    raw = raw_config(mpi_tmp_path / "x.h5", data={"name": "fashion-mnist", "root": FMNIST,
                                                   "partition": {"kind": "shards", "classes_per_device": 2}},
                     model={"name": "logreg", "args": {}}, train={"rounds": 2, "batch_size": 16})
    got = same_on_every_size(mpi_tmp_path, "fmnist", raw)
    if WORLD.rank == 0:
        assert got["metrics"]["test_accuracy"][-1] > 0.3  # 10 classes: well above chance after two rounds
        with h5py.File(mpi_tmp_path / "fmnist-0.h5", "r") as f:
            counts = f["topology/class_counts"][()]
        assert counts.shape == (6, 10) and counts.sum() == 60000
        assert ((counts > 0).sum(axis=1) <= 2).all()  # shards: at most 2 classes per device
