"""``qmlhfl-mpi plan CONFIG --round T``: the round plan of a config as a readable table.

One line per aggregation, in the order the round performs them (nested by
indentation): the node, its call in the round, its start and end on the
virtual clock, who takes part with which weight (children the policy drops
and devices found offline are marked, docs/system.md), the messages and bytes
it receives, and where its result goes.  Then the totals per link, the round's
virtual time and its critical path.  Nothing is trained: the plan is the pure
:meth:`~qmlhfl_mpi.core.scheduler.RoundScheduler.round` of the config's tree,
``tau``, participation, seed and system (``docs/architecture.md``, "The life
of one global round"); the rounds before ``T`` are timed for its start.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from itertools import islice

import numpy as np

from .. import config as config_mod
from ..config import Config
from ..config import build as builders
from ..core.exitcodes import EXIT_OK
from ..core.plan import OPEN
from ..core.scheduler import TimedRound
from ..core.tiers import ARRIVE, FLUSH, SEND, START, TieredSchedule, TierEvent
from ..core.topology import Tree
from .clockfit import ClockModel

__all__ = ["add_arguments", "buffered_lines", "cmd_plan", "plan_lines"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round", type=int, default=0, metavar="T", help="the global round to plan (default 0)")
    p.add_argument("--max-children", type=int, default=12, metavar="K",
                   help="participants listed per aggregation before '...' (default 12)")


def _samples(cfg: Config, tree: Tree) -> np.ndarray | None:
    """Training samples per device when children are weighted by samples (the data set is read for them)."""
    if cfg.topology.weighting != "samples":
        return None
    return builders.local_data(cfg, tree, range(0), 0, 1).samples


def _kept_weights(timed: TimedRound) -> list[dict[int, float]]:
    """Per aggregation of the drawn plan, the weight of each child it aggregates (empty when it is dropped)."""
    clock, drawn = timed.clock, timed.drawn.aggregations
    kept = iter(timed.plan.aggregations)
    out: list[dict[int, float]] = []
    alive: list[bool] = []
    for a in drawn:
        ok = a.parent < 0 or (alive[a.parent] and bool(clock.keep[a.parent][a.slot]))
        alive.append(ok)
        if ok:
            k = next(kept)
            out.append(dict(zip(k.children.tolist(), k.weights.tolist())))
        else:
            out.append({})
    return out


def plan_lines(cfg: Config, timed: TimedRound, tree: Tree, dim: int, max_children: int = 12,
               t0: float = 0.0) -> list[str]:
    """The table of the round ``timed`` that starts at virtual time ``t0`` (see the module doc)."""
    plan, clock = timed.drawn, timed.clock
    links = builders.links(cfg)
    msg = [lk.codec.nbytes(dim) for lk in links]
    down = [4 * dim if lk.downlink is None else lk.downlink.nbytes(dim) for lk in links]
    out = [f"round {plan.round}: N={tree.N}, {tree.num_devices} devices, tau={list(cfg.tau)}, seed {plan.seed}; "
           f"{len(plan.aggregations)} aggregations (layer:node#call; times in virtual s from the round's start at "
           f"{t0:.6g} s; children as layer-(n-1) ids with weights, dropped or offline ones marked)",
           f"{'aggregation':<24} {'start..end s':>17} {'participants (weight)':<60} {'msgs':>5} {'bytes up':>11}  then"]
    depth = 0
    down_bytes = np.zeros(tree.N, dtype=np.int64)
    weights = _kept_weights(timed)
    for kind, i in plan.events:
        if kind != OPEN:
            depth -= 1
            continue
        a = plan.aggregations[i]
        n = a.layer
        inside = a.parent >= 0 and not weights[i] and bool(clock.keep[i].any())  # under a dropped child
        kids = [f"{c}({weights[i][c]:.3g})" if c in weights[i] else f"{c}(offline)" if not clock.online[i][j]
                else f"{c}(kept)" if inside and clock.keep[i][j] else f"{c}(dropped)"
                for j, c in enumerate(a.children.tolist())]
        shown = ", ".join(kids[:max_children]) + (f", ... {len(kids) - max_children} more" if len(kids) > max_children
                                                  else "")
        if a.empty:
            then = "nobody takes part: keeps its model" + (", goes up" if a.last else "")
        elif a.down:
            then = f"down to {plan.fanout(tree, a)} children"
            down_bytes[n - 1] += down[n - 1] * plan.fanout(tree, a)
        else:
            then = f"up to {n + 1}:{tree.parent(n, a.node)}"
        if inside:
            then += " (inside a dropped child: timed, not trained)"
        name = f"{'  ' * depth}{n}:{a.node}#{a.call}"
        span = f"{clock.start[i]:.4g}..{clock.end[i]:.4g}"
        out.append(f"{name:<24} {span:>17} {shown or '-':<60} {len(a.children):>5} "
                   f"{len(a.children) * msg[n - 1]:>11,}  {then}")
        depth += 1
    messages = plan.messages()
    out.append("per link: " + "; ".join(
        f"link {n}: {int(messages[n - 1])} messages of {msg[n - 1]:,} bytes ({int(messages[n - 1]) * msg[n - 1]:,}), "
        f"downlink {int(down_bytes[n - 1]):,} bytes" for n in range(1, tree.N + 1)))
    trained = timed.plan.trained()
    out.append(f"devices trained: {len(trained)} of {tree.num_devices}, "
               f"{sum(trained.values())} local runs of tau_1 = {cfg.tau[0]} steps")
    path = " <- ".join(f"{layer}:{node}" for layer, node in clock.critical_path(plan))
    out.append(f"virtual time: {timed.duration:.6g} s (ends at {t0 + timed.duration:.6g} s); messages dropped per link "
               f"{clock.dropped.tolist()}, devices offline {clock.offline}; critical path {path}")
    return out


def buffered_lines(cfg: Config, t: int, schedule: TieredSchedule, events: list[TierEvent], t0: float) -> list[str]:
    """The events of a buffered run's round ``t`` (docs/algorithms.md, "Buffered layers"), which starts at
    virtual time ``t0``: jobs started, messages arrived, updates with their weights, deltas sent up, models
    adopted; a node is ``layer:node``, a child its position among the node's children."""
    tiers = schedule.tiers
    m = min(x.layer for x in tiers)
    ks = ", ".join(f"k_{n} = {cfg.aggregation.buffer[n - 1]}" for n in range(m, cfg.N + 1))
    out = [f"round {t} of buffered layers {m}..{cfg.N} ({ks}): {len(events)} events from {t0:.6g} s (a job is one "
           f"synchronous round of a layer-{m} node's child's subtree)"]
    for e in events:
        x = tiers[e.tier]
        node = f"{x.layer}:{x.node}"
        if e.kind == START:
            timed = e.payload
            out.append(f"{e.time:>12.6g} s  start   {node} child {e.child} job {e.job} from version {e.version}; "
                       f"arrives at {e.time + timed.duration:.6g} s; {int(timed.plan.messages().sum())} messages inside")
        elif e.kind == ARRIVE:
            out.append(f"{e.time:>12.6g} s  arrive  {node} child {e.child} (started from version {e.version})")
        elif e.kind == FLUSH:
            weights = ", ".join(f"{c}({w:.3g})" for c, w in e.entries)
            out.append(f"{e.time:>12.6g} s  update  {node} -> version {e.version}: {weights}" +
                       ("  (ends the round)" if e.round_end else ""))
        elif e.kind == SEND:
            out.append(f"{e.time:>12.6g} s  send    {node} job {e.job} up; arrives at {e.time + x.up:.6g} s")
        else:
            out.append(f"{e.time:>12.6g} s  adopt   {node} its parent's version {e.version}")
    return out


def cmd_plan(args: argparse.Namespace, write: Callable[[str], None]) -> int:
    """Print the plan of ``args.round``; returns the exit code."""
    cfg = config_mod.load(args.config, args.set)
    if args.round < 0:
        raise ValueError(f"--round {args.round}: give a global round >= 0")
    tree = cfg.build_tree()
    dim = builders.model_dim(cfg)
    sched = ClockModel(cfg, tree, dim).scheduler(cfg.tau, samples=_samples(cfg, tree))
    t0 = sched.start_of(args.round)
    if sched.buffered is not None:
        schedule = sched.schedule()
        events = next(islice(schedule.rounds(), args.round, None))
        lines = buffered_lines(cfg, args.round, schedule, events, t0)
    else:
        lines = plan_lines(cfg, sched.round(args.round, t0), tree, dim, args.max_children, t0)
    for line in lines:
        write(line)
    return EXIT_OK
