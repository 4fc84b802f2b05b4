"""``qmlhfl-mpi plan CONFIG --round T``: the round plan of a config as a readable table.

One line per aggregation, in the order the round performs them (nested by
indentation): the node, its call in the round, who takes part with which
weight, the messages and bytes it receives, and where its result goes.  Then
the totals per link.  Nothing is trained: the plan is the pure
:meth:`~qmlhfl_mpi.core.plan.Planner.plan` of the config's tree, ``tau``,
participation and seed (``docs/architecture.md``, "The life of one global
round").
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from .. import config as config_mod
from ..config import Config
from ..config import build as builders
from ..core.exitcodes import EXIT_OK
from ..core.plan import OPEN, Planner, RoundPlan
from ..core.topology import Tree

__all__ = ["add_arguments", "cmd_plan", "plan_lines"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round", type=int, default=0, metavar="T", help="the global round to plan (default 0)")
    p.add_argument("--max-children", type=int, default=12, metavar="K",
                   help="participants listed per aggregation before '...' (default 12)")


def _samples(cfg: Config, tree: Tree) -> np.ndarray | None:
    """Training samples per device when children are weighted by samples (the data set is read for them)."""
    if cfg.topology.weighting != "samples":
        return None
    return builders.local_data(cfg, tree, range(0), 0, 1).samples


def plan_lines(cfg: Config, plan: RoundPlan, tree: Tree, dim: int, max_children: int = 12) -> list[str]:
    """The table of ``plan`` (see the module doc)."""
    links = builders.links(cfg)
    msg = [lk.codec.nbytes(dim) for lk in links]
    down = [4 * dim if lk.downlink is None else lk.downlink.nbytes(dim) for lk in links]
    out = [f"round {plan.round}: N={tree.N}, {tree.num_devices} devices, tau={list(cfg.tau)}, seed {plan.seed}; "
           f"{len(plan.aggregations)} aggregations (layer:node#call; children as layer-(n-1) ids with weights)",
           f"{'aggregation':<24} {'participants (weight)':<60} {'msgs':>5} {'bytes up':>11}  then"]
    depth = 0
    down_bytes = np.zeros(tree.N, dtype=np.int64)
    for kind, a in plan:
        if kind != OPEN:
            depth -= 1
            continue
        n = a.layer
        kids = [f"{c}({w:.3g})" for c, w in zip(a.children.tolist(), a.weights.tolist())]
        shown = ", ".join(kids[:max_children]) + (f", ... {len(kids) - max_children} more" if len(kids) > max_children
                                                  else "")
        if a.empty:
            then = "nobody takes part: keeps its model" + (", goes up" if a.last else "")
        elif a.down:
            then = f"down to {tree.num_devices_of(n, a.node)} devices"
            down_bytes[n - 1] += down[n - 1] * len(tree.children(n, a.node))
        else:
            then = f"up to {n + 1}:{tree.parent(n, a.node)}"
        name = f"{'  ' * depth}{n}:{a.node}#{a.call}"
        out.append(f"{name:<24} {shown or '-':<60} {len(a.children):>5} {len(a.children) * msg[n - 1]:>11,}  {then}")
        depth += 1
    messages = plan.messages()
    out.append("per link: " + "; ".join(
        f"link {n}: {int(messages[n - 1])} messages of {msg[n - 1]:,} bytes ({int(messages[n - 1]) * msg[n - 1]:,}), "
        f"downlink {int(down_bytes[n - 1]):,} bytes" for n in range(1, tree.N + 1)))
    trained = plan.trained()
    out.append(f"devices trained: {len(trained)} of {tree.num_devices}, "
               f"{sum(trained.values())} local runs of tau_1 = {cfg.tau[0]} steps")
    return out


def cmd_plan(args: argparse.Namespace, write: Callable[[str], None]) -> int:
    """Print the plan of ``args.round``; returns the exit code."""
    cfg = config_mod.load(args.config, args.set)
    if args.round < 0:
        raise ValueError(f"--round {args.round}: give a global round >= 0")
    tree = cfg.build_tree()
    planner = Planner(tree, cfg.tau, builders.participation(cfg), cfg.train.seed, _samples(cfg, tree))
    for line in plan_lines(cfg, planner.plan(args.round), tree, builders.model_dim(cfg), args.max_children):
        write(line)
    return EXIT_OK
