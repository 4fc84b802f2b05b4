"""Write the sweep files of the studies in docs/experiments.md (issue 12): ``studies/<study>.txt``.

    .venv/bin/python studies/generate.py            # all studies but optvsrandom (no compute: seconds)
    .venv/bin/python studies/generate.py optvsrandom  # runs qmlhfl-mpi optimize --calibrate first (~2 min)

Every line of a sweep file is one run, ``studies/configs/fmnist_base.yaml --set ...`` with its seed
and its results file ``results/studies/<study>/<variant>-seed<S>.h5``; the ``# report:`` line holds the
report options.  Run a study with

    .venv/bin/qmlhfl-mpi sweep --file studies/<study>.txt --jobs 2 --continue

(one run per core, one rank each: results do not depend on the rank count), which reports when the
runs are done: the table (mean ± std over the seeds), ``docs/img/studies/<study>.csv`` and the plots
``docs/img/studies/<study>_*.png``.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "studies/configs/fmnist_base.yaml"
SEEDS = (0, 1, 2)
OUT = "results/studies"
IMG = "docs/img/studies"


def lst(values) -> str:
    """A YAML flow list without blanks (jobs/sweep.sbatch splits lines on blanks)."""
    return "[" + ",".join(str(v) for v in values) + "]"


def links(n: int, device: float, middle: float, cloud: float) -> list[float]:
    """Per-link values, device link first, cloud link last (n >= 2)."""
    return [device] + [middle] * (n - 2) + [cloud]


def latency_sets(n: int) -> list[str]:
    """The slow-cloud deadline model: 10 ms per SGD step; device link 10 Mbit/s and 20 ms; links between
    aggregators 100 Mbit/s and 20 ms; the cloud link 10 Mbit/s and 200 ms (10x the device link's latency)."""
    return [f"latency.uplink_rate={lst(links(n, 1.0e7, 1.0e8, 1.0e7))}",
            f"latency.uplink_latency={lst(links(n, 0.02, 0.02, 0.2))}"]


D_MLP200 = 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # 199,210 parameters


def modelled_round(sets: list[str]) -> float:
    """Modelled seconds of one round of the base config with ``sets`` (the deadline model of docs/theory.md)."""
    from qmlhfl_mpi.config import build, load_config
    from qmlhfl_mpi.core.theory import LatencyModel, round_time

    cfg = load_config(str(REPO / BASE), sets)
    lat = LatencyModel(cfg.latency.step_time, cfg.link_rates(), cfg.link_latencies())
    return round_time(D_MLP200, cfg.tau, build.codecs(cfg), cfg.build_tree(), lat)


def write(study: str, header: str, report: str, variants: list[tuple[str, list[str]]],
          seeds: tuple[int, ...] = SEEDS, base: str = BASE) -> None:
    lines = [f"# Study '{study}' of docs/experiments.md, written by studies/generate.py; run with",
             f"#   .venv/bin/qmlhfl-mpi sweep --file studies/{study}.txt --jobs 2 --continue",
             *(f"# {h}" for h in header.strip().splitlines()),
             f"# report: --out {IMG} --prefix {study} --csv {IMG}/{study}.csv {report}"]
    for name, sets in variants:
        for s in seeds:
            words = [base, *(w for x in sets for w in ("--set", x)), "--set", f"train.seed={s}",
                     "--set", f"output.path={OUT}/{study}/{name}-seed{s}.h5"]
            lines.append(" ".join(words))
    path = REPO / "studies" / f"{study}.txt"
    path.write_text("\n".join(lines) + "\n")
    print(f"{path.relative_to(REPO)}: {len(variants)} variants x {len(seeds)} seeds = {len(variants) * len(seeds)} runs")


DEPTH_DEADLINE = 40.0  # modelled seconds


def depth() -> None:
    """Depth at equal prod(tau) = 32 under edge-level heterogeneity, slow cloud link."""
    trees = {2: [8, 8], 3: [2, 4, 8], 4: [2, 2, 2, 8]}
    taus = [(32, 1), (16, 2), (8, 4), (4, 8), (2, 16), (1, 32), (4, 4, 2), (2, 4, 4), (8, 2, 2), (4, 2, 2, 2),
            (2, 2, 2, 4)]
    variants = []
    for tau in taus:
        n = len(tau)
        assert math.prod(tau) == 32
        sets = [f"topology.branching={lst(trees[n])}", f"tau={lst(tau)}",
                f"quantizer.levels={lst([4] + [8] * (n - 1))}", "data.partition.kind=edge-shards", *latency_sets(n)]
        rounds = max(40, math.ceil(DEPTH_DEADLINE / modelled_round(sets)))  # every run reaches the deadline
        variants.append((f"n{n}-tau{'-'.join(map(str, tau))}", [*sets, f"train.rounds={rounds}"]))
    write("depth", """
64 devices in 8 edges of 8; edge-shards (each edge's 8 devices share a pool of 4 classes, 2 per device);
prod(tau) = 32 SGD steps per cloud round in every run: the N = 2 splits (32,1) .. (1,32) and N = 3, 4 splits;
QSGD s = 4 on the device link, 8 above, bucket 512; 40 rounds, or more where 40 rounds take less than the
40 s of modelled time at which the report compares the runs (--at-time 40).""", "--target 0.75 --last 5 --at-time 40 "
          "--label-keys tau", variants)


def quant_layers() -> None:
    """Which link's levels matter, N = 3, at bucket 0, 512 and tensor; compounding of prod(1 + q_n)."""
    variants = [("float32", ["quantizer.levels=[none,none,none]"])]
    for bucket in ("0", "512", "tensor"):
        for name, levels in (("l1", "[4,none,none]"), ("l2", "[none,4,none]"), ("l3", "[none,none,4]"),
                             ("all", "[4,4,4]")):
            variants.append((f"b{bucket}-{name}", [f"quantizer.levels={levels}", f"quantizer.bucket={bucket}"]))
    variants = [(n, ["topology.branching=[2,2,8]", "tau=[4,2,2]", *latency_sets(3), *sets]) for n, sets in variants]
    write("quant_layers", """
N = 3: 32 devices, 2 regional servers of 2 edges of 8 devices; tau = (4, 2, 2); shards of 2 classes per
device; QSGD s = 4 on one link (l1, l2, l3) or on all three (all), float32 on the others, at bucket 0
(one norm), 512 and tensor (one norm per parameter tensor); 60 rounds.""",
          "--last 5 --label-keys quantizer.levels,quantizer.bucket", variants)


def biased() -> None:
    """Biased codecs on the device link (with and without EF) against QSGD at equal bytes."""
    # d = 199,210, bucket 512: qsgd/round s = 1 is 4*390 + ceil(2d/8) = 51,363 bytes; topk keeps k values
    # at 4k + ceil(18k/8) bytes: k = 8,218 (fraction 0.04125) matches 51,363; sign is 26,463 bytes.
    f = 0.04125
    one = "quantizer.levels=[1,none]"
    variants = [("float32", ["quantizer.levels=[none,none]"]),
                ("qsgd", [one]),
                ("qsgd-ef", [one, "quantizer.error_feedback=[true,false]"])]
    for kind, extra in (("round", [one]), ("topk", ["quantizer.levels=[1,none]", f"quantizer.topk_fraction=[{f},0.01]"]),
                        ("sign", ["quantizer.levels=[1,none]"])):
        for ef in (False, True):
            variants.append((kind + ("-ef" if ef else ""),
                             [f"quantizer.kind=[{kind},qsgd]", *extra,
                              f"quantizer.error_feedback=[{str(ef).lower()},false]"]))
    write("biased", """
N = 2: 32 devices in 4 edges of 8; tau = (4, 4); shards of 2 classes per device; the device link carries
qsgd s = 1, round s = 1 or topk (fraction 0.04125), all 51.4 kB per message, or sign (26.5 kB, half),
each with and without error feedback; the edge -> cloud link is float32; 60 rounds.""",
          "--last 5 --label-keys quantizer.kind,quantizer.error_feedback", variants)


def selection() -> None:
    """Device selection: participation.fraction at the device link vs at the edge link, equal bytes."""
    variants = []
    for part in ("edge-shards", "shards"):
        p = part.replace("-", "")
        variants += [(f"{p}-full", [f"data.partition.kind={part}"]),
                     (f"{p}-devices-half", [f"data.partition.kind={part}", "participation.fraction=[0.5,1]"]),
                     (f"{p}-edges-half", [f"data.partition.kind={part}", "participation.fraction=[1,0.5]"])]
    write("selection", """
N = 2: 32 devices in 4 edges of 8; tau = (4, 4); QSGD s = (4, 8), bucket 512; each edge draws 4 of its 8
devices at every edge aggregation (devices-half) or the cloud draws 2 of the 4 edges per cloud round
(edges-half): the same 64 device messages per cloud round (against 128 with all); edge-shards and
shards partitions; 60 rounds.""", "--last 5 --label-keys data.partition.kind,participation.fraction", variants)


def hetero() -> None:
    """Heterogeneity at one budget, N = 3."""
    variants = [("iid", ["data.partition.kind=iid"])]
    variants += [(f"dirichlet{a}", ["data.partition.kind=dirichlet", f"data.partition.alpha={a}"])
                 for a in ("0.1", "0.3", "1.0")]
    variants += [("shards2", ["data.partition.kind=shards"]), ("edgeshards", ["data.partition.kind=edge-shards"])]
    variants = [(n, ["topology.branching=[2,2,8]", "tau=[4,2,2]", "quantizer.levels=[4,8,8]", *latency_sets(3),
                     *sets]) for n, sets in variants]
    write("hetero", """
N = 3: 32 devices, 2 regional servers of 2 edges of 8 devices; tau = (4, 2, 2); QSGD s = (4, 8, 8), bucket
512; IID, Dirichlet(0.1, 0.3, 1.0) over labels, 2-class shards, edge-shards (4 classes per edge); 60 rounds.""",
          "--target 0.8 --last 5 --label-keys data.partition.kind,data.partition.alpha", variants)


STRAGGLER_STEP = 0.05      # seconds per SGD step of the median device
STRAGGLER_DEADLINE = 0.45  # seconds after an edge sends its model: 1.5x the median device's arrival
STRAGGLER_AT = 40.0        # virtual seconds of the accuracy-at-time comparison
STRAGGLER_SEEDS = (0, 1, 2, 3, 4)  # 3 seeds left effects under a point (docs/experiments.md, study 7)


def stragglers(seeds: tuple[int, ...] = STRAGGLER_SEEDS) -> None:
    """Device speeds lognormal(sigma), sigma 0 / 0.5 / 1, x the edges' policy: all, deadline, first_k."""
    # The median device (speed factor 1 at every sigma) trains tau_1 = 4 steps in 0.2 s and its message
    # (101,165 bytes at 10 Mbit/s + 20 ms) arrives 0.301 s after its edge sent the model; the deadline is
    # 1.5x that (devices more than 1.75x slower than the median miss it); first_k keeps 6 of the 8 devices.
    variants = []
    for sigma in ("0", "0.5", "1"):
        for name, sets in (("all", ["aggregation.policy=[all,all]"]),
                           ("deadline", ["aggregation.policy=[deadline,all]",
                                         f"aggregation.deadline=[{STRAGGLER_DEADLINE},0]",
                                         "aggregation.min_children=[4,1]"]),
                           ("first_k", ["aggregation.policy=[first_k,all]", "aggregation.k=[6,0]"])):
            variants.append((f"sigma{sigma}-{name}", [f"latency.step_time={STRAGGLER_STEP}",
                                                      f"system.speed=lognormal({sigma})", *sets,
                                                      "train.rounds=40"]))
    write("stragglers", f"""
N = 2: 32 devices in 4 edges of 8; tau = (4, 4); QSGD s = (4, 8), bucket 512; shards of 2 classes per device;
device speeds lognormal(sigma), sigma 0 / 0.5 / 1, drawn once per device (median {STRAGGLER_STEP} s per step, no
jitter); the edges wait for all 8 devices (all), for those within {STRAGGLER_DEADLINE} s of sending their model, at
least 4 (deadline), or for the first 6 (first_k); the cloud waits for all 4 edges; 40 rounds; accuracy at
{STRAGGLER_AT:g} virtual seconds.""", f"--target 0.75 --last 5 --at-time {STRAGGLER_AT:g} "
          "--label-keys system.speed,aggregation.policy", variants, seeds)


def asynchrony(seeds: tuple[int, ...] = STRAGGLER_SEEDS) -> None:
    """Study 8: under lognormal(1) device speeds, edges that wait for all, edges with a deadline, and a buffered
    cloud (k = 2 or 1 of its 4 edges, polynomial(0.5) staleness) over edges that wait for all.  5 seeds: with
    seeds 0-2 several effects were under a point."""
    base = [f"latency.step_time={STRAGGLER_STEP}", "system.speed=lognormal(1)", "train.rounds=40"]
    variants = [
        ("all", [*base, "aggregation.policy=[all,all]"]),
        ("deadline", [*base, "aggregation.policy=[deadline,all]", f"aggregation.deadline=[{STRAGGLER_DEADLINE},0]",
                      "aggregation.min_children=[4,1]"]),
        ("buffered-k2", [*base, "aggregation.policy=[all,buffered]", "aggregation.buffer=[0,2]",
                         "aggregation.staleness=[constant,polynomial(0.5)]"]),
        ("buffered-k1", [*base, "aggregation.policy=[all,buffered]", "aggregation.buffer=[0,1]",
                         "aggregation.staleness=[constant,polynomial(0.5)]"]),
    ]
    write("asynchrony", f"""
N = 2: 32 devices in 4 edges of 8; tau = (4, 4); QSGD s = (4, 8), bucket 512; shards of 2 classes per device;
device speeds lognormal(1) (median {STRAGGLER_STEP} s per step); the edges wait for all 8 devices (all) or for
those within {STRAGGLER_DEADLINE} s, at least 4 (deadline), under a synchronous cloud; or a buffered cloud over
edges that wait for all, updating every 2 (k2) or every arriving edge (k1), stale updates weighted
(1 + s)^-0.5; a buffered round is ceil(4 / k) cloud updates; 40 rounds; accuracy at {STRAGGLER_AT:g} virtual
seconds.""", f"--target 0.75 --last 5 --at-time {STRAGGLER_AT:g} --label-keys aggregation.policy,aggregation.buffer",
          variants, seeds)


def mobility(seeds: tuple[int, ...] = SEEDS) -> None:
    """Study 9: devices moving between edges (random, uniform) with probability p per round under edge-level
    heterogeneity (edge-shards)."""
    base = [f"latency.step_time={STRAGGLER_STEP}", "system.speed=lognormal(0.5)", "data.partition.kind=edge-shards",
            "train.rounds=40"]
    variants = [("p0", [*base, "mobility.model=static"])]
    variants += [(f"p{p}", [*base, "mobility.model=random", f"mobility.p={p}"]) for p in ("0.05", "0.2", "1")]
    write("mobility", f"""
N = 2: 32 devices in 4 edges of 8; tau = (4, 4); QSGD s = (4, 8), bucket 512; edge-shards (each edge's devices
share a pool of 4 classes, 2 per device): edge-level heterogeneity; device speeds lognormal(0.5) (median
{STRAGGLER_STEP} s per step); each round every device moves to another edge (uniformly) with probability p in
0 / 0.05 / 0.2 / 1, taking its data along; 40 rounds; accuracy per round and at {STRAGGLER_AT:g} virtual seconds.""",
          f"--target 0.7 --last 5 --at-time {STRAGGLER_AT:g} --label-keys mobility.model,mobility.p", variants, seeds)


PRIVACY_BASE = "studies/configs/fmnist_privacy.yaml"
PRIVACY_EPSILONS = (1, 4, 8)


def privacy_sigma(epsilon: float, placement: str) -> float:
    """The noise multiplier whose epsilon after the privacy base's 30 rounds is ``epsilon`` (to 1e-4, from
    above): the accountant of the run, by bisection (epsilon falls as sigma grows)."""
    from qmlhfl_mpi.config import build, load_config
    from qmlhfl_mpi.core.privacy import Accountant

    sets = PRIVACY_PLACEMENTS[placement]
    cfg = load_config(str(REPO / PRIVACY_BASE), [*sets, "privacy.noise_multiplier=1"])
    tree = cfg.build_tree()
    dim = build.model_dim(cfg)
    _, acc = build.privacy(cfg, tree, dim, build.codecs(cfg))
    lo, hi = 0.1, 200.0
    while hi / lo > 1 + 1e-5:
        mid = math.sqrt(lo * hi)
        got = Accountant(mid, acc.releases, acc.edges, acc.delta, acc.shares).epsilon(cfg.train.rounds)
        lo, hi = (lo, mid) if got <= epsilon else (mid, hi)
    return round(hi, 4)


PRIVACY_PLACEMENTS = {
    "central": ["privacy.placement=central"],
    "edge": ["privacy.placement=edge", "privacy.layer=1"],
    "local": ["privacy.placement=local"],
    # 32-bit integer codes (4 bytes each, like float32): 16 bits leave the 64 children's sum no room for the
    # noise's 8 standard deviations at a useful scale; the shares of all 64 group members carry the noise
    "distributed": ["privacy.placement=distributed", "quantizer.kind=[intsum,qsgd]", "quantizer.levels=[32,0]",
                    "quantizer.rotate=[true,false]", "privacy.secure_aggregation=[true,false]",
                    "privacy.secure_threshold=64"],
}


def privacy() -> None:
    """Study 10 (issue 23): each noise placement at epsilon 1, 4, 8 (delta = 1/256) after 30 rounds, and without
    noise (clipping only, epsilon infinite) over QSGD and over the distributed placement's integer codes."""
    variants = [("inf", []), ("distributed-inf", PRIVACY_PLACEMENTS["distributed"])]
    sigmas = []
    for where, sets in PRIVACY_PLACEMENTS.items():
        for eps in PRIVACY_EPSILONS:
            sigma = privacy_sigma(eps, where)
            sigmas.append(f"{where} eps {eps}: sigma {sigma}")
            variants.append((f"{where}-eps{eps}", [*sets, f"privacy.noise_multiplier={sigma}"]))
    write("privacy", f"""
N = 2: 256 devices in 4 edges of 64 (IID Fashion-MNIST), multinomial logistic regression; tau = (4, 1); every
device in every round; link 1 QSGD s = 255, bucket 512, link 2 float32 (distributed: 32-bit intsum codes, rotated,
masked, groups of 64); clip C = 0.5; 30 rounds; Gaussian noise at the cloud (central), at each edge (edge), at each
device (local) or in discrete shares under secure aggregation (distributed), its multiplier set for epsilon 1, 4, 8
at delta = 1/256 after 30 rounds by the run's own accountant:
{chr(10).join(sigmas)}""", "--target 0.75 --last 5 --label-keys privacy.placement,privacy.noise_multiplier", variants,
          SEEDS, PRIVACY_BASE)


def admm(seeds: tuple[int, ...] = SEEDS) -> None:
    """Study 11 (issue 24, open question 1): ADMM at the edges (FedADMM, rho 0.01 / 0.1 / 1) against averaging,
    under edge-level heterogeneity (edge-shards) and the base config's quantized links; every run trains one
    device at a time (ADMM's per-device anchors), so averaging does too."""
    base = ["data.partition.kind=edge-shards", "train.rounds=40", "train.vectorize=off"]
    variants = [("avg", [*base, "admm.layer=0"])]
    variants += [(f"admm-rho{r}", [*base, "admm.layer=1", f"admm.rho={r}"]) for r in ("0.01", "0.1", "1")]
    write("admm", """
N = 2: 32 devices in 4 edges of 8; tau = (4, 4); QSGD s = (4, 8), bucket 512; edge-shards (each edge's devices
share a pool of 4 classes, 2 per device): edge-level heterogeneity; the edges average their devices' models
(avg) or run ADMM with them (FedADMM: a dual per device, the augmented local problem, the augmented model sent)
with rho 0.01 / 0.1 / 1; 40 rounds; one device at a time (train.vectorize off) in every run.""",
          "--target 0.7 --last 5 --label-keys admm.layer,admm.rho", variants, seeds)


def admm_regions(seeds: tuple[int, ...] = SEEDS) -> None:
    """Study 11, second part: ADMM above the edges.  N = 3 (2 regions of 2 edges of 8 devices), tau (4, 2, 2),
    edge-shards; the regions average their edges (avg), or run ADMM with them (layer 2), or the edges run it
    with their devices (layer 1), rho 1; one device at a time in every run."""
    base = ["topology.branching=[2,2,8]", "tau=[4,2,2]", "quantizer.levels=[4,8,8]", "latency.uplink_rate=[1e7,1e8,1e7]",
            "latency.uplink_latency=[0.02,0.02,0.2]", "data.partition.kind=edge-shards",
            "train.rounds=40", "train.vectorize=off"]
    variants = [("avg", [*base, "admm.layer=0"]), ("admm-layer1", [*base, "admm.layer=1", "admm.rho=1"]),
                ("admm-layer2", [*base, "admm.layer=2", "admm.rho=1"])]
    write("admm_regions", """
N = 3: 32 devices, 2 regions of 2 edges of 8; tau = (4, 2, 2); QSGD s = (4, 8, 8), bucket 512; edge-shards (each
edge's devices share a pool of 4 classes): the edges and the regions differ; averaging everywhere (avg), ADMM at
the edges with their devices (layer 1), or at the regions with their edges as clients (layer 2: each edge's subtree
trains toward its anchor), rho 1; 40 rounds; one device at a time (train.vectorize off) in every run.""",
          "--target 0.7 --last 5 --label-keys admm.layer,admm.rho", variants, seeds)


STUDIES = {"depth": depth, "quant_layers": quant_layers, "biased": biased, "selection": selection,
           "hetero": hetero, "stragglers": stragglers, "asynchrony": asynchrony, "mobility": mobility,
           "privacy": privacy, "admm": admm, "admm_regions": admm_regions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", help=f"default: {' '.join(STUDIES)}; also: optvsrandom")
    args = ap.parse_args()
    for name in args.studies or list(STUDIES):
        if name == "optvsrandom":
            subprocess.run([sys.executable, str(REPO / "studies" / "optvsrandom.py")], check=True)
        else:
            STUDIES[name]()


if __name__ == "__main__":
    main()
