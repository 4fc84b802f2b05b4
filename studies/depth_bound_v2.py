"""What bound v2 (docs/theory.md section 17) predicts for the depth study's tau splits, in its own unit.

    .venv/bin/python studies/depth_bound_v2.py > studies/depth_bound_v2.out     # about 2 min

Row 5 of docs/experiments.md used to rank the variants by "drift + Q", which added a gradient-squared quantity
to a pure coefficient.  Here every variant is scored by the whole bound v2 on (1/(T K)) sum E||grad f||^2, one
unit, with the constants ESTIMATED once per tree at the initial model: L (largest Hessian eigenvalue), zeta_n^2
(per-layer heterogeneity), sigma^2 (the minibatch gradient's variance at the study's batch size), gap0 (the
initial loss, f* >= 0) and the links' effective q_n (the codecs on the devices' first local updates).  The step is
common to all variants: half the smallest admissible step of bound v2 over them.  Per round: T = 40 rounds; at
the deadline: T = the rounds that fit 40 modelled seconds.  Smaller is better.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import depth_bound as db  # noqa: E402
import generate as g  # noqa: E402


def sigma2_estimate(cfg, batches: int = 8) -> float:  # type: ignore[no-untyped-def]
    """Mean over up to 8 devices of E||g_B - g||^2 at the initial model, minibatches of train.batch_size."""
    import numpy as np
    import torch

    from qmlhfl_mpi.analysis.planner import _model_and_data
    from qmlhfl_mpi.learning.train import loss_fn

    _, model, data = _model_and_data(cfg)
    params = [p for p in model.parameters()]
    rng = np.random.default_rng(0)

    def grad(x, y):  # type: ignore[no-untyped-def]
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(x), y), params)]).detach()

    out = []
    for x, y in data.train.values():
        full = grad(x, y)
        b = min(cfg.train.batch_size, len(y))
        out.append(np.mean([float(((grad(x[i], y[i]) - full) ** 2).sum())
                            for i in (torch.from_numpy(rng.choice(len(y), b, replace=False)) for _ in range(batches))]))
    return float(np.mean(out))


def main() -> None:
    import torch

    from qmlhfl_mpi.analysis.planner import _model_and_data, _smoothness, estimate_effective_q, estimate_heterogeneity
    from qmlhfl_mpi.config import build, load_config
    from qmlhfl_mpi.core.bound_v2 import bound_v2, max_lr_v2, noise_shares, v2_terms
    from qmlhfl_mpi.core.theory import LatencyModel, round_time, tree_constants
    from qmlhfl_mpi.learning.train import loss_fn

    torch.set_num_threads(1)
    rows, est = [], {}
    for name, sets in db.variants():
        cfg = load_config(str(g.REPO / g.BASE), sets)
        tree = cfg.build_tree()
        codecs = build.codecs(cfg)
        key = (tuple(cfg.topology.branching), tuple(cfg.quantizer.levels), cfg.tau[0])
        if key[:1] not in est:
            _, model, data = _model_and_data(cfg)
            with torch.no_grad():
                gap0 = float(sum(float(loss_fn(model(x), y)) for x, y in data.train.values()) / len(data.train))
            est[key[:1]] = (estimate_heterogeneity(cfg), _smoothness(cfg, None)[0], sigma2_estimate(cfg), gap0)
        if key not in est:
            est[key] = estimate_effective_q(cfg, codecs)
        zeta, L, s2, gap0 = est[key[:1]]
        q_eff = est[key]
        c = tree_constants(tree)
        t = v2_terms(cfg.tau, q_eff, c.alpha, c.beta, noise_shares(tree), c.s2)
        lat = LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())
        rt = round_time(g.D_MLP200, cfg.tau, codecs, tree, lat)
        rows.append((name, cfg, t, zeta, L, s2, gap0, q_eff, rt, max_lr_v2(L, t, s2, True)))
    mu = 0.5 * min(r[-1] for r in rows)
    print(f"common step mu = {mu:.4g} (half the smallest admissible step of bound v2); T = 40 per round, "
          "floor(40 s / round time) at the deadline\n")
    print("| variant | tau | zeta_n^2 | sigma^2 | gap0 | effective q_n | L | bound v2, 40 rounds | "
          "bound v2 at 40 s | biggest term (40 rounds) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, cfg, t, zeta, L, s2, gap0, q_eff, rt, _ in rows:
        per_round = bound_v2(40, mu, L, t, s2, gap0, zeta)
        T = max(1, math.floor(g.DEPTH_DEADLINE / rt))
        at_deadline = bound_v2(T, mu, L, t, s2, gap0, zeta)
        top = max(per_round.shares().items(), key=lambda kv: kv[1])
        print(f"| {name} | {list(cfg.tau)} | {', '.join(f'{z:.3g}' for z in zeta)} | {s2:.3g} | {gap0:.3g} | "
              f"{', '.join(f'{q:.3g}' for q in q_eff)} | {L:.3g} | {per_round.total:.6g} | {at_deadline.total:.6g} | "
              f"{top[0]} {100 * top[1]:.0f}% |")


if __name__ == "__main__":
    main()
