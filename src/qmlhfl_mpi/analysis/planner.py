"""`qmlhfl-mpi check`: the theory applied to a config, and the estimates `optimize` shares
(:mod:`qmlhfl_mpi.analysis.optimizer`).

A serial command (no MPI).  It reads the config, sizes the messages from the
real model, estimates the smoothness constant ``L`` from the data when it is
not given, and prints what :mod:`qmlhfl_mpi.theory` says about it.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .. import config as config_mod
from ..config import Config
from ..config import build as builders
from ..config.sizing import available_memory, sizing
from ..core.bound_v2 import bound_v2, max_lr_v2, noise_shares, v2_terms
from ..core.codecs import Codec
from ..core.exitcodes import EXIT_LR_VIOLATED, EXIT_OK, EXIT_USAGE
from ..core.memory import estimate_memory, fits, format_bytes
from ..core.participation import expected_messages
from ..core.theory import (
    LatencyModel,
    condition_terms,
    error_factor,
    layer_condition_terms,
    layer_drift_coefficients,
    max_lr,
    q_per_link,
    round_time_parts,
    tree_constants,
)
from ..core.topology import Tree, messages_per_round
from ..data.local import LocalData
from ..learning.train import loss_fn
from .clockfit import ClockModel


def _model_and_data(cfg: Config, max_devices: int = 8) -> tuple[Tree, torch.nn.Module, LocalData]:
    tree = cfg.build_tree()
    devices = range(min(tree.num_devices, max_devices))
    data = builders.local_data(cfg, tree, devices, 0, 1)
    return tree, builders.model(cfg, data.input_shape, data.num_classes), data


def estimate_smoothness(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        iters: int = 30, seed: int = 0) -> float:
    """Largest Hessian eigenvalue magnitude of the loss at the model's current
    parameters, by power iteration with Hessian-vector products, maximised over
    ``batches`` (e.g. one per device).  A local estimate of ``L``."""
    params = [p for p in model.parameters()]
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for x, y in batches:
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn(p.shape, generator=g) for p in params]
        lam = 0.0
        for _ in range(iters):
            norm = math.sqrt(sum(float((t * t).sum()) for t in v)) or 1.0
            v = [t / norm for t in v]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            lam = math.sqrt(sum(float((t * t).sum()) for t in hv))
            v = [t.detach() for t in hv]
        best = max(best, lam)
    return best


def _smoothness(cfg: Config, given: float | None) -> tuple[float, str]:
    if given is not None:
        if not given > 0:
            raise config_mod.ConfigError(f"--L {given!r}: the smoothness constant must be > 0")
        return given, "given"
    _, model, data = _model_and_data(cfg)
    batches = [(x[:512], y[:512]) for x, y in data.train.values()]
    L = estimate_smoothness(model, batches, seed=cfg.train.seed)
    return L, f"ESTIMATE: largest Hessian eigenvalue at the initial model over {len(batches)} devices' data"


def estimate_effective_q(cfg: Config, codecs: Sequence[Codec], max_devices: int = 8, draws: int = 4,
                         max_samples: int = 256) -> list[float]:
    """ESTIMATES of each link's *effective* quantization factor (docs/theory.md section 17):
    ``mean ||Q(u) - u||^2 / ||u||^2`` of the link's codec over the first local updates
    ``u = -lr tau_1 grad f_i(w0)`` of (at most ``max_devices``) devices at the initial model (full-batch gradients
    on at most ``max_samples`` samples), ``draws`` quantizations each.  A4's ``q_n`` is the worst case over every
    vector; this is what the codec does to the run's own update directions (the links above the devices are
    measured on the same vectors: their messages are averages of them)."""
    _, model, data = _model_and_data(cfg, max_devices)
    params = [p for p in model.parameters()]
    step = cfg.train.lr * cfg.tau[0]
    updates = []
    for x, y in data.train.values():
        loss = loss_fn(model(x[:max_samples]), y[:max_samples])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).detach()
        updates.append((-step * g).numpy().astype(np.float32))
    out = []
    for n, codec in enumerate(codecs, start=1):
        ratios = []
        for i, u in enumerate(updates):
            norm2 = float(np.dot(u.astype(np.float64), u))
            if norm2 == 0:
                continue
            zero = np.zeros_like(u)
            for k in range(draws):
                got = codec.decode(codec.encode(u, zero, (cfg.train.seed, 99, n, i, k)), u.size)
                ratios.append(float(np.sum((np.asarray(got, dtype=np.float64) - u) ** 2)) / norm2)
        out.append(float(np.mean(ratios)) if ratios else 0.0)
    return out


def estimate_heterogeneity(cfg: Config, max_nodes: int = 8, max_children: int = 8, max_devices: int = 8,
                           max_samples: int = 256) -> list[float]:
    """ESTIMATES of ``zeta_n^2`` (docs/theory.md section 15) at the initial model.

    For each layer ``n`` the ``P_u``-weighted mean over (at most ``max_nodes``)
    layer-``n`` nodes ``u`` of ``sum_c a(c) ||grad f_c(w0) - grad f_u(w0)||^2``
    over (at most ``max_children``) children ``c``; ``grad f_c`` is the
    sample-weighted mean of the full-batch gradients of (at most ``max_devices``)
    of its devices on at most ``max_samples`` samples each, and ``grad f_u`` the
    ``a(c)``-weighted mean of the children's.  Weights are sample counts.
    """
    tree = cfg.build_tree()
    picks: list[list[tuple[int, list[int]]]] = []  # per layer: (node, children) chosen
    needed: set[int] = set()

    def devs(layer: int, node: int) -> list[int]:
        return list(tree.device_range(layer, node))[:max_devices]

    for n in range(1, tree.N + 1):
        chosen = []
        for u in range(min(tree.num_nodes(n), max_nodes)):
            kids = list(tree.children(n, u))[:max_children]
            chosen.append((u, kids))
            for c in kids:
                needed.update(devs(n - 1, c))
        picks.append(chosen)
    order = sorted(needed)
    data = builders.local_data(cfg, tree, order, 0, 1)
    model = builders.model(cfg, data.input_shape, data.num_classes)
    params = [p for p in model.parameters()]
    samples = np.asarray(data.samples, dtype=np.float64)
    grads: dict[int, torch.Tensor] = {}
    for d in order:
        x, y = data.train[d]
        loss = loss_fn(model(x[:max_samples]), y[:max_samples])
        grads[d] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).detach().double()

    def node_grad(layer: int, node: int) -> tuple[torch.Tensor, float]:
        ds = devs(layer, node)
        w = torch.tensor([samples[d] for d in ds], dtype=torch.float64)
        g = sum(wi * grads[d] for wi, d in zip(w, ds)) / w.sum()
        span = tree.device_range(layer, node)
        return torch.as_tensor(g), float(samples[span.start:span.stop].sum())

    out = []
    for n, chosen in enumerate(picks, start=1):
        num = den = 0.0
        for _u, kids in chosen:
            gs, ws = zip(*(node_grad(n - 1, c) for c in kids))
            a = torch.tensor(ws, dtype=torch.float64) / sum(ws)
            gu = sum(ai * g for ai, g in zip(a, gs))
            div = float(sum(ai * float(((g - gu) ** 2).sum()) for ai, g in zip(a, gs)))
            num += sum(ws) * div
            den += sum(ws)
        out.append(num / den if den > 0 else 0.0)
    return out


def _outside_bound(cfg: Config) -> list[str]:
    """The configured options the convergence bound does not model."""
    out = []
    p, t, q = cfg.participation, cfg.train, cfg.quantizer
    if any(f < 1 for f in p.fraction) or any(a < 1 for a in p.availability):
        out.append("sampling/availability")
    if t.momentum or t.weight_decay or t.prox_mu or t.lr_schedule != "constant":
        out.append("client optimiser options")
    if any(o != "avg" for o in cfg.server.optimizer):
        out.append(f"server.optimizer {list(cfg.server.optimizer)}")
    if any(q.error_feedback):
        out.append("error feedback")
    if any(q.downlink):
        out.append("downlink quantization")
    if cfg.mobility.model != "static":
        out.append(f"devices that move (mobility.model {cfg.mobility.model}: the tree, its weights D(c)/D(u) and the "
                   "per-layer heterogeneity change from round to round; the bound assumes one fixed tree)")
    buffered = [n for n, p in enumerate(cfg.aggregation.policy, start=1) if p == "buffered"]
    if buffered:
        out.append(f"buffered layers {buffered[0]}..{cfg.N} (updates from stale models, weighted by "
                   "aggregation.staleness: the bound assumes every child starts from its parent's newest model; it "
                   "still holds for the synchronous layers below within one job)")
    if cfg.privacy.clip > 0:
        out.append(f"differential privacy (updates clipped to {cfg.privacy.clip:g}, a biased step; noise placed "
                   f"{cfg.privacy.placement}: the bound has no noise term for it; docs/privacy.md)")
    if cfg.failures.intervals or cfg.failures.trace:
        out.append("edge servers that fail (their devices move or sit out, so the weights and the devices taking "
                   "part change while they are down)")
    return out


def memory_report(cfg: Config, ranks: int, write: Callable[[str], None]) -> bool:
    """Print the estimated peak memory per rank on ``ranks`` ranks, term by term, and whether it fits this
    node's memory (``train.memory_limit_gb``, else what this node has); returns whether it fits."""
    if ranks < 1:
        raise ValueError(f"--ranks {ranks}: give the number of MPI ranks the run will use, >= 1")
    s = sizing(cfg, ranks)
    est = estimate_memory(s)
    write(f"memory per rank on {ranks} rank{'s' if ranks != 1 else ''} (estimate, docs/hpc.md 'Sizing'): "
          f"{format_bytes(est.total)}")
    for line in est.lines():
        write(f"  {line}")
    available, source = available_memory(ranks, cfg.train.memory_limit_gb)
    problem = fits(s, available, source)
    write(f"  fits: {'yes' if problem is None else 'NO'} ({format_bytes(available)} per rank: {source})")
    if problem:
        write(f"WARNING: {problem}")
    return problem is None


CHECK_ROUNDS = 20  # rounds of the virtual clock `check` computes for the spread


def _costs(latency: LatencyModel, clock: ClockModel) -> list[float]:
    return [b / r + lat for b, r, lat in zip(clock.up_bits, latency.uplink_rate, latency.uplink_latency)]


def privacy_lines(cfg: Config, tree: Tree, dim: int, codecs: Sequence[Codec]) -> list[str]:
    """What ``check`` says of the ``privacy`` section (docs/privacy.md): the mechanism, the epsilon the run
    reaches and where a budget stops it; raises :class:`~qmlhfl_mpi.config.ConfigError` as the run would."""
    got = builders.privacy(cfg, tree, dim, codecs)
    if got is None:
        return []
    mech, acc = got
    p, T = cfg.privacy, cfg.train.rounds
    where = {"local": "at every device", "edge": f"at every layer-{mech.layer} node", "central": "at the cloud",
             "distributed": "in shares at every device, added to its masked integer codes"}[p.placement]
    scale = "sigma C" if mech.layer == 0 else f"sigma C kappa omega (kappa = {mech.kappa:.4g}, link 1's codec; omega " \
                                              "the largest device weight in the sum)"
    if mech.shares:
        scale = f"sigma (omega C gamma + sqrt(d')) / sqrt({mech.shares}) per share in code units ({acc.shares[0]} " \
                f"codes; the shares of any {mech.shares} survivors carry the noise)"
    kind = "discrete Gaussian" if mech.shares else "Gaussian"
    out = [f"privacy: updates clipped to C = {p.clip:g}, {kind} noise {where} with std {scale}, sigma = "
           f"{p.noise_multiplier:g}; replace-one device, {acc.releases} noised release(s) per device per round, "
           f"edge sampling {', '.join(f'{m} of {n}' for n, m in acc.edges)} (docs/privacy.md)"]
    if mech.quantile:
        out.append(f"  adaptive clip (Andrew et al. 2021): from C = {p.clip:g} toward the {mech.quantile:g} quantile "
                   f"of the update norms, step {mech.clip_lr:g}; each noise-adding party adds N(0, "
                   f"{mech.count_std:g}^2) to its count of updates within C, and the update's noise multiplier is "
                   f"{mech.update_sigma:.4g}, so that both together cost sigma = {mech.sigma:g}")
    eps = acc.epsilon(T)
    how = "the distributed discrete Gaussian's bound (Kairouz et al. 2021)" if mech.shares else "dp-accounting"
    out.append(f"  epsilon after {T} rounds = {eps:.4g} at delta = {acc.delta:.3g} (RDP accountant, {how}); "
               f"after 1 round {acc.epsilon(1):.4g}")
    if p.target_epsilon:
        k = acc.rounds_within(p.target_epsilon, T)
        out.append(f"  privacy.target_epsilon = {p.target_epsilon:g}: " + (
            f"the run stops after {k} of {T} rounds (epsilon {acc.epsilon(k):.4g})" if k < T else
            f"not reached in {T} rounds"))
    return out


def bound_v2_lines(cfg: Config, tree: Tree, qs: Sequence[float], L: float, zeta: Sequence[float]) -> list[str]:
    """What ``check`` says of bound v2 (docs/theory.md section 17): its window coefficients, its admissible lr
    next to the old one, and at ``train.lr`` each drift term's share (full gradients, the zeta ESTIMATES)."""
    c = tree_constants(tree)
    t = v2_terms(cfg.tau, qs, c.alpha, c.beta, noise_shares(tree), c.s2)
    hetero = any(z > 0 for z in zeta)
    lr2 = max_lr_v2(L, t, 0.0, hetero)
    out = [f"bound v2 (docs/theory.md section 17): window coefficients W_n = {', '.join(f'{w:.4g}' for w in t.W)}, "
           f"quantization inside the windows Q_n = {', '.join(f'{q:.4g}' for q in t.Q)}; admissible lr < "
           f"{lr2:.4g} (full gradients)"]
    lr = cfg.train.lr if cfg.train.lr < lr2 else 0.9 * lr2
    where = "train.lr" if lr == cfg.train.lr else f"0.9 x the admissible lr ({lr:.4g}; train.lr fails the condition)"
    b = bound_v2(max(cfg.train.rounds, 1), lr, L, t, 0.0, 0.0, list(zeta))
    if not b.admissible or not math.isfinite(b.total) or b.total <= 0:
        return out
    shares = {k: v for k, v in b.shares().items() if k.startswith("drift") or k == "quant_noise"}
    names = {"quant_noise": "injected quantization noise", "drift_noise": "quantization noise inside the windows"}
    out.append(f"  at {where}, shares of its drift and noise terms: " + ", ".join(
        f"{names.get(k, k.replace('drift_', 'layer ') + ' heterogeneity')} {100 * v:.1f}%"
        for k, v in shares.items()) +
        f" (lambda = {', '.join(f'{lam:.3g}' for lam in b.lam)}, chosen for the whole bound)")
    return out


def cmd_check(args: argparse.Namespace, write: Callable[[str], None]) -> int:
    """Print the check report through ``write``; returns the exit code."""
    cfg = config_mod.load(args.config, args.set)
    if not memory_report(cfg, args.ranks, write) and cfg.train.memory_check:
        write("the run would be refused for its memory: nothing more is checked (the tree is not built)")
        return EXIT_USAGE
    tree = cfg.build_tree()
    dim = builders.model_dim(cfg)
    codecs = builders.codecs(cfg)
    qs = q_per_link(dim, codecs)
    parts = round_time_parts(dim, cfg.tau, codecs, tree, builders.latency(cfg))
    write(f"config {args.config}: N={tree.N}, {tree.num_devices} devices, {dim} parameters, tau={list(cfg.tau)}")
    write(f"{'link':>4} {'codec':>24} {'q_n':>10} {'bytes/msg':>10} {'msgs/round':>10} {'bytes/round':>12} "
          f"{'model_s/round':>13}")
    part = builders.participation(cfg)
    for n, codec in enumerate(codecs, start=1):
        nb = codec.nbytes(dim)
        msgs = expected_messages(tree, cfg.tau, n, part)
        q = f"{qs[n - 1]:.4g}" if not codec.biased else "biased"
        write(f"{n:>4} {codec.name:>24} {q:>10} {nb:>10} {msgs:>10.4g} {nb * msgs:>12.6g} {parts.comm[n - 1]:>13.4g}")
    if not part.is_full:
        write(f"participation: fractions {list(part.fraction)}, availability {list(part.availability)} "
              f"({part.weighting}); msgs/round and bytes/round are expected values (full participation: "
              f"{[messages_per_round(tree, cfg.tau, n) for n in range(1, tree.N + 1)]}); children send in "
              "parallel, so the modelled time per aggregation does not change")
    down = [c for c in builders.downlink_codecs(cfg) if c is not None]
    if down:
        write(f"downlink: {', '.join(c.name for c in down)}; the "
              "deadline model counts uplink messages only")
    biased = [n for n, c in enumerate(codecs, start=1) if c.biased]
    if biased:
        write(f"links {biased} use biased codecs: the convergence bound below does not cover them "
              "(their q_n is not a variance bound)")
    for warning in builders.error_feedback_warnings(cfg.quantizer.error_feedback or (False,) * tree.N, codecs, dim):
        write(f"WARNING: {warning}")
    outside = _outside_bound(cfg)
    if outside:
        write(f"outside the bound's assumptions (full participation, plain local SGD, averaging servers, "
              f"unbiased uplinks, exact downlinks, a fixed tree): {', '.join(outside)}; the bound below ignores them")
    write(f"SGD steps per device per round: {math.prod(cfg.tau)}; closed-form round time {parts.total:.4g} s "
          f"(compute {parts.compute:.4g} s)")
    clock = ClockModel(cfg, tree, dim)
    rounds = min(cfg.train.rounds, CHECK_ROUNDS)
    times = clock.durations(cfg.tau, rounds)
    write(f"virtual time per round under the system model (docs/system.md, {rounds} rounds): mean "
          f"{times.mean():.4g} s, min {times.min():.4g} s, max {times.max():.4g} s; {cfg.train.rounds} rounds "
          f"take about {times.mean() * cfg.train.rounds:.4g} s")
    if cfg.aggregation.policy and cfg.aggregation.policy[-1] == "buffered":
        a = cfg.aggregation
        ks = ", ".join(f"layer {n}: every {k}" for n, (p, k) in enumerate(zip(a.policy, a.buffer), start=1)
                       if p == "buffered")
        write(f"  buffered layers, an update every k arrivals ({ks}); a round = ceil(cloud children / "
              f"{a.buffer[-1]}) cloud updates; no round waits for a set of children")
    else:
        for line in clock.dominance(cfg.tau, rounds).lines():
            write(f"  {line}")
    for line in privacy_lines(cfg, tree, dim, codecs):
        write(line)
    L, how = _smoothness(cfg, args.L)
    terms = condition_terms(cfg.tau, qs, tree)
    bound = max_lr(L, cfg.tau, qs, tree)
    ok = cfg.train.lr < bound
    write(f"quantization error factor prod(1 + q_n) = {error_factor(qs):.4g}")
    write(f"L = {L:.4g} ({how})")
    write(f"drift terms: paper-visible {terms.visible:.4g}, cross-layer {terms.cross:.4g}, quantization "
          f"{sum(terms.quant_drift):.4g}; injected quantization noise {sum(terms.quant_noise):.4g} (docs/theory.md)")
    write(f"learning-rate condition 1 - L^2 mu^2 B > 0 with B = {terms.B:.4g}: admissible lr < {bound:.4g}")
    write(f"configured train.lr = {cfg.train.lr:g}: {'satisfies the condition' if ok else 'VIOLATES the condition'}")
    zeta = estimate_heterogeneity(cfg)
    coef = layer_drift_coefficients(cfg.tau, qs, tree)
    parts_h = [c * z for c, z in zip(coef, zeta)]
    total_h = sum(parts_h)
    shares = ", ".join(f"layer {n} {100 * v / total_h:.1f}%" if total_h > 0 else f"layer {n} -"
                       for n, v in enumerate(parts_h, start=1))
    write(f"zeta_n^2 = {', '.join(f'{z:.4g}' for z in zeta)} (ESTIMATE: per-layer heterogeneity at the initial "
          f"model, at most 8 nodes per layer and 256 samples per device; docs/theory.md section 15)")
    lt = layer_condition_terms(cfg.tau, qs, tree)
    write(f"per-layer bound: B_Gamma' = {lt.B_gamma:.4g} (gradient {lt.K0:.4g}, quantization noise Q = {lt.Q:.4g}), "
          f"B' = {lt.B:.4g}: admissible lr < {1.0 / (L * math.sqrt(lt.B)):.4g}")
    write(f"per-layer drift coefficients c_n = {', '.join(f'{c:.4g}' for c in coef)}; share of the "
          f"heterogeneity drift 2 sum c_n zeta_n^2: {shares} (optimize --zeta2-layers uses these constants)")
    for line in bound_v2_lines(cfg, tree, qs, L, zeta):
        write(line)
    q_eff = estimate_effective_q(cfg, codecs)
    write(f"effective q_n = {', '.join(f'{q:.4g}' for q in q_eff)} against A4's q_n = "
          f"{', '.join(f'{q:.4g}' for q in qs)} (ESTIMATE: each link's codec on the first local updates of up to 8 "
          "devices at the initial model; docs/theory.md section 17)")
    for line in bound_v2_lines(cfg, tree, q_eff, L, zeta)[:1]:
        write("  with them, " + line)
    if not ok and args.strict:
        return EXIT_LR_VIOLATED
    return EXIT_OK
