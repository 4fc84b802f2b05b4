"""`qmlhfl-mpi optimize`: ``tau`` for a deadline, by the bound (optionally calibrated to pilot runs,
docs/theory.md sections 11 and 16) or by successive halving of pilots on the virtual clock (``--search halving``,
section 18; :mod:`qmlhfl_mpi.analysis.search`).  Serial: the pilots run one after another in this process.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import config as config_mod
from ..config import Config
from ..config import build as builders
from ..core.exitcodes import EXIT_OK
from ..core.optimize import optimize_tau
from ..core.theory import round_time
from ..core.topology import Tree
from . import calibrate as cal
from . import search as search_mod
from .clockfit import ClockModel
from .planner import _costs, _outside_bound, _smoothness

__all__ = ["cmd_optimize"]


def _parse_pilot_tau(text: str, N: int, max_tau: int) -> tuple[int, ...]:
    try:
        tau = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"--pilot-tau {text!r}: expected {N} comma-separated integers, e.g. "
                         f"{','.join(['2'] * N)}") from None
    if len(tau) != N or any(not 1 <= t <= max_tau for t in tau):
        raise ValueError(f"--pilot-tau {text!r}: expected {N} integers in 1..{max_tau} (--max-tau), e.g. "
                         f"{','.join(['2'] * N)}")
    return tau


def _calibrate(args: argparse.Namespace, cfg: Config, tree: Tree, L: float, lr: float,
               run_pilot: cal.PilotRunner, write: Callable[[str], None]) -> tuple[float, str]:
    """Run the pilots, fit the scale ``c``; report through ``write``.  Returns ``(c, summary)``."""
    if args.lr is not None and args.lr != cfg.train.lr:
        raise ValueError(f"--calibrate with --lr {args.lr!r} != train.lr {cfg.train.lr!r}: the pilots train at "
                         f"train.lr; drop --lr or pass --set train.lr={args.lr!r}")
    dim, codecs, lat = builders.model_dim(cfg), builders.codecs(cfg), builders.latency(cfg)
    taus = ([_parse_pilot_tau(t, tree.N, args.max_tau) for t in args.pilot_tau] if args.pilot_tau
            else cal.default_pilot_taus(cfg.tau, args.max_tau))
    fits = [t for t in taus if round_time(dim, t, codecs, tree, lat) <= args.deadline]
    if not fits:
        raise ValueError(f"no pilot tau fits one round into --deadline {args.deadline!r} s "
                         f"(pilots {[list(t) for t in taus]}): raise the deadline or give smaller --pilot-tau")
    model = cal.BoundModel(L=L, lr=lr, qs=cal.qs_of(cfg), tree=tree, G0=cal.initial_gradient_norm2(cfg),
                           sigma2=args.sigma2, gap0=args.gap0, zeta2=args.zeta2,
                           zeta2_layers=(tuple(args.zeta2_layers) if getattr(args, "zeta2_layers", None)
                                         else None))
    pilots = cal.run_pilots(cfg, fits, args.pilot_rounds, run_pilot)
    used = [p for p in pilots if math.isfinite(p.measured) and p.measured > 0]
    if not used:
        raise ValueError(f"no pilot's training loss fell over {args.pilot_rounds} rounds "
                         f"(losses {[list(p.losses) for p in pilots]}): raise --pilot-rounds or lower train.lr")
    c_max = model.c_max([p.tau for p in pilots])
    c, sse = cal.fit_scale([p.measured for p in used],
                           lambda i, c: model.rate(used[i].tau, used[i].round_time, c), c_max)
    write(f"calibration: G0 = ||grad f(w0)||^2 = {model.G0:.4g} (ESTIMATE), {args.pilot_rounds} pilot rounds each; "
          f"raw bound admissible lr < {c_max * lr:.4g} for the pilots, configured lr = {lr:g} "
          f"({lr / (c_max * lr):.3g} x)")
    for p in pilots:
        ok = p in used
        pred = model.rate(p.tau, p.round_time, c)
        write(f"  pilot tau = {list(p.tau)}: round {p.round_time:.4g} s, train loss {p.losses[0]:.4g} -> "
              f"{p.losses[-1]:.4g}; loss decrease per modelled s measured {p.measured:.4g}, predicted {pred:.4g}"
              + ("" if ok else " (not used: the loss did not fall)"))
    rank_note = ""
    if len(used) >= 2:
        meas_rank = np.argsort(np.argsort([p.measured for p in used]))
        pred_rank = np.argsort(np.argsort([model.rate(p.tau, p.round_time, c) for p in used]))
        rank_note = f"; pilot ranking {'agrees' if (meas_rank == pred_rank).all() else 'DISAGREES'} with the measured one"
    level = math.exp(float(np.mean([math.log(model.rate(p.tau, p.round_time, c) / p.measured) for p in used])))
    write(f"fitted scale c = {c:.6g} (L_eff = c L = {c * L:.4g}; c_max = {c_max:.4g}; spread of the log errors "
          f"{sse:.4g} over {len(used)} pilots; predictions are {level:.3g} x the measured level{rank_note})")
    if c > c_max * (1 - 1e-4):
        write("  the fit sits at the high end (c -> c_max): the pilots differ more than the bound's penalties can "
              "explain inside the learning-rate condition; take the optimum as a heuristic")
    if c < c_max * 1e-5:
        write("  the fit sits at the low end of the search (c -> 0): the pilots fall at least as fast as the bound's "
              "noise-free descent predicts, so the calibrated bound ranks tau by SGD steps per modelled second")
    summary = (f"from pilots {' '.join(','.join(map(str, p.tau)) for p in used)} "
               f"({args.pilot_rounds} rounds each, L = {L:.6g}, lr = {lr:g})")
    return c, summary


def cmd_optimize(args: argparse.Namespace, write: Callable[[str], None],
                 run_pilot: cal.PilotRunner | None = None) -> int:
    """Run the optimiser, report through ``write``; returns the exit code.

    With ``args.calibrate`` the bound's scale is first fitted to pilot runs made
    by ``run_pilot`` (:mod:`qmlhfl_mpi.analysis.calibrate`)."""
    cfg = config_mod.load(args.config, args.set)
    if args.write and Path(args.write).exists() and not args.overwrite:
        raise ValueError(f"--write {args.write!r} exists; pass --overwrite to replace it")
    tree = cfg.build_tree()
    dim = builders.model_dim(cfg)
    if getattr(args, "search", "bound") == "halving":
        return _optimize_by_search(args, cfg, tree, dim, write, run_pilot)
    L, how = _smoothness(cfg, args.L)
    lr = cfg.train.lr if args.lr is None else args.lr
    calibrate = bool(getattr(args, "calibrate", False))
    scale, cal_note = 1.0, ""
    if calibrate:
        if run_pilot is None:
            raise ValueError("--calibrate needs a pilot runner: use the qmlhfl-mpi command line")
        scale, cal_note = _calibrate(args, cfg, tree, L, lr, run_pilot, write)
    clock = ClockModel(cfg, tree, dim)
    fitted, err = clock.fitted_latency(cfg.tau)
    write(f"round time fitted to the virtual clock (docs/system.md): {fitted.step_time:.4g} s per SGD step, per "
          f"aggregation {', '.join(f'link {n} {c:.4g} s' for n, c in enumerate(_costs(fitted, clock), start=1))}; "
          f"largest error over the design {100 * err:.1f}%")
    res = optimize_tau(dim, builders.codecs(cfg), tree, fitted, args.deadline, scale * L,
                       lr, max_tau=args.max_tau, sigma2=args.sigma2, gap0=args.gap0, zeta2=args.zeta2,
                       n_random=args.random, seed=cfg.train.seed,
                       zeta2_layers=getattr(args, "zeta2_layers", None))
    write(f"L = {L:.4g} ({how}); lr = {lr:g}; deadline {args.deadline:g} s; tau_n in 1..{args.max_tau}"
          + (f"; CALIBRATED bound with L_eff = {scale:.4g} L = {scale * L:.4g}" if calibrate else ""))
    if getattr(args, "zeta2_layers", None) is not None:
        write(f"per-layer bound (docs/theory.md section 15) with zeta_n^2 = {list(args.zeta2_layers)}")
    biased = [n for n, c in enumerate(builders.codecs(cfg), start=1) if c.biased]
    if biased:
        write(f"links {biased} use biased codecs: the bound treats their factor as a variance, which it is not; "
              "take the optimum as a heuristic")
    outside = _outside_bound(cfg)
    if outside:
        write(f"the bound does not model {', '.join(outside)}: the optimum is the one for the plain algorithm")
    write(f"optimum tau = {list(res.tau)}: objective (bound) {res.objective:.6g}, T = {res.T} rounds of "
          f"{res.round_time:.4g} s, {res.steps} SGD steps per device, admissible lr < {res.max_lr:.4g} "
          f"({res.nodes} configurations scored)")
    on_clock = clock.rounds_within(res.tau, args.deadline)
    write(f"on the virtual clock itself, {on_clock} rounds of tau = {list(res.tau)} end within the deadline "
          f"(the fitted form says {res.T})")
    if res.random_objectives:
        write(f"{len(res.random_objectives)} random feasible tau: objective best {res.random_best:.6g}, median "
              f"{res.random_median:.6g}, worst {res.random_worst:.6g}; the optimum beats or ties "
              f"{100 * res.beaten_fraction:.1f}% of them (median / optimum = {res.median_gain:.3g})")
    if args.write:
        out = Path(args.write)
        new = dataclasses.replace(cfg, tau=tuple(res.tau), train=dataclasses.replace(cfg.train, lr=lr))
        config_mod.validate(new)
        head = f"# tau optimised by qmlhfl-mpi optimize for a {args.deadline:g} s deadline\n"
        if calibrate:
            head += f"# calibrated scale c = {scale:.6g} {cal_note}\n"
        out.write_text(head + new.to_yaml())
        write(f"wrote {out}")
    return EXIT_OK


def _optimize_by_search(args: argparse.Namespace, cfg: Config, tree: Tree, dim: int, write: Callable[[str], None],
                        run_pilot: cal.PilotRunner | None) -> int:
    """``optimize --search halving`` (:mod:`qmlhfl_mpi.analysis.search`): pilots on the virtual clock."""
    if run_pilot is None:
        raise ValueError("--search halving needs a pilot runner: use the qmlhfl-mpi command line")
    if getattr(args, "calibrate", False):
        raise ValueError("--calibrate fits the bound; --search halving uses no bound: drop one of them")
    if args.lr is not None and args.lr != cfg.train.lr:
        raise ValueError(f"--search halving with --lr {args.lr!r} != train.lr {cfg.train.lr!r}: the pilots train at "
                         f"train.lr; drop --lr or pass --set train.lr={args.lr!r}")
    if not args.deadline > 0:
        raise ValueError(f"--deadline {args.deadline!r}: expected virtual seconds > 0")
    for name, v, lo in (("--candidates", args.candidates, 1), ("--eta", args.eta, 2), ("--max-tau", args.max_tau, 1)):
        if v < lo:
            raise ValueError(f"{name} {v!r}: expected an integer >= {lo}")
    values = tuple(args.tau_values) if args.tau_values else search_mod.power_values(args.max_tau)
    if min(values) < 1:
        raise ValueError(f"--tau-values {list(values)}: expected integers >= 1")
    levels = tuple(getattr(args, "levels_values", None) or ())
    if levels:
        kinds = set(cfg.quantizer.kind) or {"qsgd"}
        if kinds != {"qsgd"} or any(not 0 <= v <= 32767 for v in levels):
            raise ValueError(f"--levels-values {list(levels)} with quantizer.kind {list(cfg.quantizer.kind) or 'qsgd'}: "
                             "the search chooses QSGD levels, 0 (float32) to 32767, on links whose codec is qsgd")
    clock = ClockModel(cfg, tree, dim)
    res = search_mod.search(cfg, clock, args.deadline, run_pilot, values=values, candidates=args.candidates,
                            eta=args.eta, validation=args.validation, levels_values=levels,
                            clock_for=lambda c: ClockModel(c, tree, dim))
    lines = res.lines()
    for line in lines:
        write(line)
    chosen_cfg = cfg if not res.chosen_levels else dataclasses.replace(
        cfg, quantizer=dataclasses.replace(cfg.quantizer, levels=res.chosen_levels))
    rounds = (clock if not res.chosen_levels else ClockModel(chosen_cfg, tree, dim)).rounds_within(res.chosen,
                                                                                                   args.deadline)
    write(f"optimum tau = {list(res.chosen)}" + (f", levels = {list(res.chosen_levels)}" if res.chosen_levels else "")
          + f": {rounds} rounds end within the {args.deadline:g} s deadline on the virtual clock")
    if args.write:
        out = Path(args.write)
        new = dataclasses.replace(chosen_cfg, tau=tuple(res.chosen),
                                  train=dataclasses.replace(cfg.train, rounds=rounds))
        config_mod.validate(new)
        head = (f"# tau optimised by qmlhfl-mpi optimize --search halving for a {args.deadline:g} s deadline of "
                f"virtual time; train.rounds = the rounds within it\n"
                + "".join(f"# {line}\n" for line in lines) + f"# search-json: {res.to_json()}\n")
        out.write_text(head + new.to_yaml())
        write(f"wrote {out}")
    return EXIT_OK
