"""What the per-layer bound (docs/theory.md section 15) predicts for the depth study's tau splits.

    .venv/bin/python studies/depth_bound.py      # about 1-2 min (zeta_n^2 estimated once per tree)

For every variant of ``studies/depth.txt`` (K = prod(tau) = 32 in all): the estimated ``zeta_n^2`` at the
initial model (``qmlhfl-mpi check``'s estimator), the heterogeneity drift ``2 sum_n c_n zeta_n^2``, the
quantization-noise part ``Q`` of the drift, and the whole bound at one common admissible step (half the
smallest admissible lr over the variants) after the rounds that fit the study's 40 s deadline; smaller
is better.  The study's measured ordering is compared with these in docs/experiments.md.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate as g  # noqa: E402


def variants() -> list[tuple[str, list[str]]]:
    out = []
    for line in (g.REPO / "studies" / "depth.txt").read_text().splitlines():
        if line.startswith("#") or "train.seed=0" not in line:
            continue
        words = line.split()
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"
                and not words[i + 1].startswith(("train.seed", "output.path"))]
        name = next(w for w in words if w.startswith("output.path=")).split("/")[-1].replace("-seed0.h5", "")
        out.append((name, sets))
    return out


def main() -> None:
    import torch

    from qmlhfl_mpi.analysis.planner import _smoothness, estimate_heterogeneity
    from qmlhfl_mpi.config import build, load_config
    from qmlhfl_mpi.core.theory import (
        LatencyModel,
        convergence_bound_layers,
        layer_condition_terms,
        layer_drift_coefficients,
        q_per_link,
        round_time,
    )

    torch.set_num_threads(1)
    rows, zeta_by_tree = [], {}
    for name, sets in variants():
        cfg = load_config(str(g.REPO / g.BASE), sets)
        tree = cfg.build_tree()
        key = tuple(cfg.topology.branching)
        if key not in zeta_by_tree:
            zeta_by_tree[key] = (estimate_heterogeneity(cfg), _smoothness(cfg, None)[0])
        zeta, L = zeta_by_tree[key]
        codecs = build.codecs(cfg)
        qs = q_per_link(g.D_MLP200, codecs)
        lat = LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())
        rt = round_time(g.D_MLP200, cfg.tau, codecs, tree, lat)
        lt = layer_condition_terms(cfg.tau, qs, tree)
        coef = layer_drift_coefficients(cfg.tau, qs, tree)
        rows.append((name, cfg, tree, zeta, L, qs, rt, lt, coef))
    mu = 0.5 * min(1.0 / (L * math.sqrt(lt.B)) for _, _, _, _, L, _, _, lt, _ in rows)
    print(f"common step mu = {mu:.4g} (half the smallest admissible lr); sigma2 = 1, gap0 = 1; T = floor(40 s / "
          "round time)\n")
    print("| variant | tau | zeta_n^2 (estimates) | 2 sum c_n zeta_n^2 | Q | round s | T | bound |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg, tree, zeta, L, qs, rt, lt, coef in rows:
        T = max(1, math.floor(g.DEPTH_DEADLINE / rt))
        b = convergence_bound_layers(T, mu, L, cfg.tau, qs, tree, 1.0, 1.0, zeta)
        drift = 2 * sum(c * z for c, z in zip(coef, zeta))
        print(f"| {name} | {list(cfg.tau)} | {', '.join(f'{z:.3g}' for z in zeta)} | {drift:.4g} | {lt.Q:.4g} | "
              f"{rt:.3g} | {T} | {b:.4g} |")


if __name__ == "__main__":
    main()
