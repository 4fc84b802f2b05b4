"""The verdicts of docs/experiments.md: paired comparisons over seeds, read from the studies' HDF5 files.

    .venv/bin/python studies/verdicts.py          # after the studies ran (results/studies/<study>/)

Runs of one study with the same seed share the data split (``data.partition.seed`` follows
``train.seed``), so each comparison is paired: the per-seed difference ``A - B`` of a metric, its mean
and its standard error ``sd / sqrt(n)``.  The rule, fixed before reading the numbers: **confirmed** when
the mean difference lies in the claimed direction by more than 2 standard errors (about a 90% one-sided
level for n = 3 with the t distribution's heavier tail), **refuted** when it lies 2 standard errors the
other way, **inconclusive** otherwise.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import h5py
import numpy as np

RES = Path(__file__).resolve().parents[1] / "results" / "studies"
SEEDS = (0, 1, 2)
VIRTUAL = ("stragglers", "asynchrony", "mobility")  # studies read on the virtual clock


SEEDS_OF = {"stragglers": (0, 1, 2, 3, 4), "asynchrony": (0, 1, 2, 3, 4)}  # studies with more seeds than SEEDS


def seeds(study: str) -> tuple[int, ...]:
    return SEEDS_OF.get(study, SEEDS)


def curve(study: str, variant: str, seed: int) -> dict[str, np.ndarray]:
    """Test accuracy and loss per round, and the time after each round: the virtual clock's
    (``/metrics/virtual_time``, docs/system.md) where the study uses a system model, else the
    closed form's cumulative ``modelled_time`` (the two agree when every device and link is alike)."""
    with h5py.File(RES / study / f"{variant}-seed{seed}.h5", "r") as f:
        m = f["metrics"]
        t = m["virtual_time"][()] if study in VIRTUAL else np.cumsum(m["modelled_time"][()])
        return {"acc": m["test_accuracy"][()], "loss": m["test_loss"][()], "t": t, "status": str(f.attrs["status"])}


def diverged(study: str, variant: str) -> list[int]:
    """Rounds done by the seeds whose run stopped as 'diverged' (the engine stops a run whose loss or
    model is no longer finite; its last accuracies then count as they are)."""
    out = []
    for s in seeds(study):
        c = curve(study, variant, s)
        if c["status"] == "diverged":
            out.append(len(c["acc"]))
    return out


def last(k: int):
    return lambda c: float(c["acc"][-k:].mean())


def window(lo: int, hi: int):
    """Mean test accuracy over rounds lo..hi (counted from 1)."""
    return lambda c: float(c["acc"][lo - 1:hi].mean())


def at_time(t: float):
    def f(c: dict[str, np.ndarray]) -> float:
        ok = np.flatnonzero(c["t"] <= t * (1 + 1e-12))
        return float(c["acc"][ok[-1]]) if ok.size else math.nan
    return f


def rounds_to(target: float, cap: int):
    """Rounds to reach ``target`` (cap + 1 if never: a conservative stand-in)."""
    def f(c: dict[str, np.ndarray]) -> float:
        hit = np.flatnonzero(c["acc"] >= target)
        return float(hit[0] + 1) if hit.size else float(cap + 1)
    return f


def final_loss(c: dict[str, np.ndarray]) -> float:
    return float(c["loss"][-1])


def values(study: str, variant: str, metric) -> np.ndarray:
    return np.array([metric(curve(study, variant, s)) for s in seeds(study)])


def time_to(target: float):
    """Time (virtual or modelled seconds) when the test accuracy first reached ``target`` (inf if never)."""
    def f(c: dict[str, np.ndarray]) -> float:
        hit = np.flatnonzero(c["acc"] >= target)
        return float(c["t"][hit[0]]) if hit.size else math.inf
    return f


def verdict(diff: np.ndarray, sign: int) -> tuple[float, float, str]:
    """Mean difference, its standard error, and the verdict for the claim ``sign * diff > 0``."""
    m = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
    if sign * m > 2 * se:
        return m, se, "confirmed"
    if -sign * m > 2 * se:
        return m, se, "refuted"
    return m, se, "inconclusive"


def compare(study: str, claim: str, a: str, b: str, metric, unit: str = "points", sign: int = 1,
            scale: float = 100.0) -> str:
    """One line: the claim 'metric(a) > metric(b)' (sign = +1) or '<' (sign = -1)."""
    va, vb = values(study, a, metric), values(study, b, metric)
    m, se, v = verdict(va - vb, sign)
    return (f"| {claim} | {a} vs {b} | {scale * va.mean():.2f} vs {scale * vb.mean():.2f} | "
            f"{scale * m:+.2f} ± {scale * se:.2f} {unit} | {v} |")


def drop_compare(study: str, claim: str, ref: str, a: str, bs: list[str], metric, scale: float = 100.0,
                 unit: str = "points") -> str:
    """Compounding: the drop of ``a`` from ``ref`` against the sum of the drops of ``bs`` (per seed)."""
    r = values(study, ref, metric)
    da = r - values(study, a, metric)
    dsum = sum(r - values(study, b, metric) for b in bs)
    m, se, v = verdict(da - dsum, 1)
    return (f"| {claim} | drop({a}) vs sum of drops({', '.join(bs)}) | {scale * da.mean():.3g} vs "
            f"{scale * dsum.mean():.3g} | {scale * m:+.3g} ± {scale * se:.2g} {unit} | {v} |")


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


HEAD = "| claim | comparison | means | difference (mean ± s.e.) | verdict |\n|---|---|---|---|---|"


def depth() -> list[str]:
    s = "depth"
    end = window(36, 40)
    out = [HEAD]
    for a in ("n3-tau4-4-2", "n4-tau4-2-2-2"):
        out.append(compare(s, "deeper is more accurate per round (rounds 36-40)", a, "n2-tau4-8", end))
        out.append(compare(s, "deeper reaches 75% in fewer rounds", a, "n2-tau4-8", rounds_to(0.75, 40),
                           unit="rounds", sign=-1, scale=1.0))
        out.append(compare(s, "deeper is more accurate at the 40 s deadline", a, "n2-tau4-8", at_time(40)))
    splits = ["n2-tau32-1", "n2-tau16-2", "n2-tau8-4", "n2-tau4-8", "n2-tau2-16", "n2-tau1-32"]
    acc = [values(s, v, end).mean() for v in splits]
    dl = [values(s, v, at_time(40)).mean() for v in splits]
    out.append(f"\nN = 2 splits, (32,1) .. (1,32): mean accuracy over rounds 36-40 "
               f"{', '.join(f'{100 * a:.2f}' for a in acc)} %; at the 40 s deadline "
               f"{', '.join(f'{100 * a:.2f}' for a in dl)} %; Spearman(tau_1, rounds 36-40 accuracy) = "
               f"{spearman([32, 16, 8, 4, 2, 1], acc):+.2f}, Spearman(tau_1, deadline accuracy) = "
               f"{spearman([32, 16, 8, 4, 2, 1], dl):+.2f}")
    bound = {}
    for line in (Path(__file__).resolve().parent / "depth_bound.out").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("n"):
            bound[cells[0]] = (float(cells[3]) + float(cells[4]), float(cells[7]))  # drift + Q, bound at deadline
    names = list(bound)
    per_round = [values(s, v, end).mean() for v in names]
    deadline = [values(s, v, at_time(40)).mean() for v in names]
    out.append(f"\nThe per-layer bound (studies/depth_bound.out) against the measurements over the {len(names)} "
               f"variants: Spearman(-(drift + Q), rounds 36-40 accuracy) = "
               f"{spearman([-bound[v][0] for v in names], per_round):+.2f} (over the N = 2 splits alone: "
               f"{spearman([-bound[v][0] for v in splits], acc):+.2f}); Spearman(-bound at the deadline, "
               f"deadline accuracy) = {spearman([-bound[v][1] for v in names], deadline):+.2f}\n")
    v2 = {}
    for line in (Path(__file__).resolve().parent / "depth_bound_v2.out").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].startswith("n"):
            v2[cells[0]] = (float(cells[7]), float(cells[8]))  # bound v2 after 40 rounds, at the deadline
    names2 = list(v2)
    out.append(f"Bound v2 in its own unit (studies/depth_bound_v2.out, docs/theory.md section 17) over the "
               f"{len(names2)} variants: Spearman(-bound v2 after 40 rounds, rounds 36-40 accuracy) = "
               f"{spearman([-v2[v][0] for v in names2], [values(s, v, end).mean() for v in names2]):+.2f} (over "
               f"the N = 2 splits alone: {spearman([-v2[v][0] for v in splits], acc):+.2f}); Spearman(-bound v2 "
               f"at the deadline, deadline accuracy) = "
               f"{spearman([-v2[v][1] for v in names2], [values(s, v, at_time(40)).mean() for v in names2]):+.2f}\n")
    out.append(HEAD)
    out.append(compare(s, "frequent edge aggregation helps per round", "n2-tau1-32", "n2-tau32-1", end))
    out.append(compare(s, "rare edge aggregation wins at the deadline", "n2-tau32-1", "n2-tau1-32", at_time(40)))
    out.append(compare(s, "best N = 3 split beats the best N = 2 split at the deadline", "n3-tau8-2-2",
                       "n2-tau16-2", at_time(40)))
    return out


def quant_layers() -> list[str]:
    s = "quant_layers"
    m = last(5)
    out = [HEAD]
    for b in ("0", "512", "tensor"):
        for other in ("l2", "l3"):
            out.append(compare(s, f"bucket {b}: the device link's levels matter most", f"b{b}-{other}", f"b{b}-l1", m))
        out.append(drop_compare(s, f"bucket {b}: the errors compound (accuracy)", "float32", f"b{b}-all",
                                [f"b{b}-l1", f"b{b}-l2", f"b{b}-l3"], m))
        div = diverged(s, f"b{b}-all")
        if div:
            out.append(f"| bucket {b}: the errors compound (final loss) | b{b}-all | {len(div)} of {len(SEEDS)} seeds "
                       f"diverged (stopped after rounds {', '.join(map(str, div))}) | - | confirmed |")
        else:
            out.append(drop_compare(s, f"bucket {b}: the errors compound (final loss)", "float32", f"b{b}-all",
                                    [f"b{b}-l1", f"b{b}-l2", f"b{b}-l3"], lambda c: -final_loss(c),
                                    scale=1.0, unit="(test loss)"))
    return out


def biased() -> list[str]:
    s = "biased"
    m = last(5)
    out = [HEAD]
    for k in ("round", "topk", "sign"):
        out.append(compare(s, f"error feedback helps {k}", f"{k}-ef", k, m))
    for k in ("round-ef", "topk-ef", "sign-ef", "qsgd-ef"):
        out.append(compare(s, "a biased codec with EF beats QSGD at equal (sign: half) bytes"
                           if k != "qsgd-ef" else "EF also helps QSGD", k, "qsgd", m))
    return out


def selection() -> list[str]:
    s = "selection"
    m = last(5)
    out = [HEAD]
    for p in ("edgeshards", "shards"):
        out.append(compare(s, f"{p}: sampling devices beats sampling edges at equal bytes", f"{p}-devices-half",
                           f"{p}-edges-half", m))
        out.append(compare(s, f"{p}: sampling half the devices costs accuracy", f"{p}-full", f"{p}-devices-half", m))
    return out


def hetero() -> list[str]:
    s = "hetero"
    m = last(5)
    out = [HEAD]
    for v in ("dirichlet1.0", "dirichlet0.3", "dirichlet0.1", "shards2", "edgeshards"):
        out.append(compare(s, "heterogeneity hurts", "iid", v, m))
    out.append(compare(s, "smaller Dirichlet alpha hurts more", "dirichlet1.0", "dirichlet0.1", m))
    out.append(compare(s, "edge-level heterogeneity hurts more than device-level", "shards2", "edgeshards", m))
    return out


def optvsrandom() -> list[str]:
    s = "optvsrandom"
    names = sorted(p.name.rsplit("-seed", 1)[0] for p in (RES / s).glob("*-seed0.h5"))
    opt = next(n for n in names if n.startswith("optimised"))
    rand = [n for n in names if n.startswith("random")]
    m = at_time(25)
    out = [HEAD]
    for r in [*rand, next(n for n in names if n.startswith("default"))]:
        out.append(compare(s, "the calibrated optimum beats a random feasible tau at the deadline", opt, r, m))
    o = values(s, opt, m)
    rm = np.mean([values(s, r, m) for r in rand], axis=0)
    mm, se, v = verdict(o - rm, 1)
    out.append(f"| ... and the mean of the {len(rand)} random draws | {opt} vs random mean | {100 * o.mean():.2f} vs "
               f"{100 * rm.mean():.2f} | {100 * mm:+.2f} ± {100 * se:.2f} points | {v} |")
    return out


def stragglers() -> list[str]:
    s = "stragglers"
    out = [HEAD]
    for p in ("deadline", "first_k"):
        for sg in ("1", "0.5"):
            out.append(compare(s, f"sigma {sg}: {p} reaches 75% sooner (virtual s)", f"sigma{sg}-{p}",
                               f"sigma{sg}-all", time_to(0.75), unit="s", sign=-1, scale=1.0))
            out.append(compare(s, f"sigma {sg}: {p} costs accuracy per round (rounds 36-40)", f"sigma{sg}-all",
                               f"sigma{sg}-{p}", window(36, 40)))
            out.append(compare(s, f"sigma {sg}: {p} is more accurate at 40 virtual s", f"sigma{sg}-{p}",
                               f"sigma{sg}-all", at_time(40)))
        out.append(compare(s, f"sigma 0: {p} changes nothing (rounds 36-40; refuted either way if it does)",
                           f"sigma0-{p}", "sigma0-all", window(36, 40)))
    return out


def asynchrony() -> list[str]:
    """Study 8 (claims fixed before the runs): a buffered cloud reaches 75% sooner than synchronous edges that
    wait for all, and is more accurate at 40 virtual s; it costs accuracy per round (stale updates); against
    edges with a deadline, no prior direction."""
    s = "asynchrony"
    out = [HEAD]
    for b in ("buffered-k2", "buffered-k1"):
        out.append(compare(s, f"{b} reaches 75% sooner than all (virtual s)", b, "all", time_to(0.75), unit="s",
                           sign=-1, scale=1.0))
        out.append(compare(s, f"{b} is more accurate than all at 40 virtual s", b, "all", at_time(40)))
        out.append(compare(s, f"{b} costs accuracy per round (rounds 36-40)", "all", b, window(36, 40)))
        out.append(compare(s, f"{b} reaches 75% sooner than deadline (virtual s)", b, "deadline", time_to(0.75),
                           unit="s", sign=-1, scale=1.0))
        out.append(compare(s, f"{b} is more accurate than deadline at 40 virtual s", b, "deadline", at_time(40)))
    out.append(compare(s, "k1 is more accurate than k2 at 40 virtual s", "buffered-k1", "buffered-k2", at_time(40)))
    return out


def mobility() -> list[str]:
    """Study 9 (claims fixed before the runs): under edge-shards, devices that move mix the edges' data and help
    (MACFL), per round and at 40 virtual s."""
    s = "mobility"
    out = [HEAD]
    for p in ("0.05", "0.2", "1"):
        out.append(compare(s, f"p = {p} is more accurate per round than p = 0 (rounds 36-40)", f"p{p}", "p0",
                           window(36, 40)))
        out.append(compare(s, f"p = {p} is more accurate than p = 0 at 40 virtual s", f"p{p}", "p0", at_time(40)))
        out.append(compare(s, f"p = {p} reaches 70% in fewer rounds than p = 0", f"p{p}", "p0", rounds_to(0.7, 40),
                           unit="rounds", sign=-1, scale=1.0))
    return out


def privacy() -> list[str]:
    """Study 10 (issue 23; directions from the noise's standard deviation, fixed before the runs): at equal epsilon,
    a trusted edge tier (edge) beats trusting nobody (local: each device's noise; 8x the std here), and ties
    trusting nobody under secure aggregation (distributed: the same std, no codec factor kappa); trusting the
    cloud too (central) beats edge (half the std over 4 edges)."""
    s = "privacy"
    out = [HEAD]
    for eps in (1, 4, 8):
        out.append(compare(s, f"a trusted edge tier is more accurate than local noise at epsilon {eps}",
                           f"edge-eps{eps}", f"local-eps{eps}", last(5)))
        out.append(compare(s, f"a trusted edge tier is more accurate than distributed noise at epsilon {eps}",
                           f"edge-eps{eps}", f"distributed-eps{eps}", last(5)))
        out.append(compare(s, f"a trusted cloud is more accurate than a trusted edge tier at epsilon {eps}",
                           f"central-eps{eps}", f"edge-eps{eps}", last(5)))
    out.append(compare(s, "without noise, the distributed placement's 32-bit codes lose accuracy against QSGD "
                          "s = 255", "distributed-inf", "inf", last(5), sign=-1))
    return out


def admm() -> list[str]:
    """Study 11 (issue 24, open question 1): ADMM at the edges against averaging under edge-level heterogeneity
    and quantized links, per penalty rho (the issue's question; no direction fixed for rho)."""
    s = "admm"
    out = [HEAD]
    for rho in ("0.01", "0.1", "1"):
        out.append(compare(s, f"ADMM with rho {rho} is more accurate than averaging (last 5 of 40 rounds)",
                           f"admm-rho{rho}", "avg", last(5)))
        out.append(compare(s, f"ADMM with rho {rho} reaches 70% in fewer rounds than averaging", f"admm-rho{rho}",
                           "avg", rounds_to(0.7, 40), unit="rounds", sign=-1, scale=1.0))
    return out


def admm_regions() -> list[str]:
    """Study 11, second part: ADMM at the regions (layer 2, the edges' subtrees as clients) and at the edges
    (layer 1), rho 1, against averaging on an N = 3 tree with edge-shards."""
    s = "admm_regions"
    out = [HEAD]
    for v, what in (("admm-layer2", "ADMM at the regions"), ("admm-layer1", "ADMM at the edges")):
        out.append(compare(s, f"{what} is more accurate than averaging (last 5 of 40 rounds)", v, "avg", last(5)))
        out.append(compare(s, f"{what} reaches 70% in fewer rounds than averaging", v, "avg", rounds_to(0.7, 40),
                           unit="rounds", sign=-1, scale=1.0))
    out.append(compare(s, "ADMM at the regions is more accurate than at the edges (no direction fixed)",
                       "admm-layer2", "admm-layer1", last(5)))
    return out


STUDIES = {"depth": depth, "quant_layers": quant_layers, "biased": biased, "selection": selection,
           "hetero": hetero, "optvsrandom": optvsrandom, "stragglers": stragglers, "asynchrony": asynchrony,
           "mobility": mobility, "privacy": privacy, "admm": admm, "admm_regions": admm_regions}


def main() -> None:
    for name in sys.argv[1:] or list(STUDIES):
        print(f"### {name}\n")
        print("\n".join(STUDIES[name]()) + "\n")


if __name__ == "__main__":
    main()
