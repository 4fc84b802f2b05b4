"""Run configuration: frozen dataclasses loaded from YAML with strict validation.

Every field carries its valid range in its metadata (see :func:`fld`), so the
loader checks types and ranges generically and the schema can be listed
(:func:`schema`).  Unknown keys are errors that list the valid keys.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.codecs import CODECS
from ..core.failures import FALLBACKS, UNITS
from ..core.mobility import MODELS as MOBILITY_MODELS
from ..core.mobility import NEIGHBOURS
from ..core.participation import WEIGHTINGS
from ..core.partition import PARTITIONERS
from ..core.policy import POLICIES
from ..core.registry import PluginError, Registry
from ..core.schedule import SCHEDULES
from ..core.server_opt import SERVER_OPTIMIZERS
from ..core.system import Distribution, TraceError
from ..core.topology import TopologyError, Tree, TreeShape
from ..data.registry import DATASETS
from ..learning.registry import MODELS
from .dynamics import (
    validate_admm,
    validate_buffered,
    validate_moves,
    validate_privacy,
    validate_secure_aggregation,
)
from .errors import ConfigError


def fld(default: Any, *, lo: float | None = None, hi: float | None = None,
        choices: Sequence[Any] | None = None, lo_open: bool = False, doc: str = "",
        registry: Registry | None = None) -> Any:
    """A dataclass field with its validation rule in the metadata; ``registry``
    makes the valid values the registry's names or a plug-in reference."""
    meta = {"lo": lo, "hi": hi, "choices": tuple(choices) if choices else None,
            "lo_open": lo_open, "doc": doc, "registry": registry}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TopologyConfig:
    branching: tuple[int, ...] | None = fld(None, lo=1, doc="fan-out per layer, cloud first")
    tree: Any = fld(None, doc="explicit tree as nested lists; an integer k is a layer-1 node with k devices")
    weighting: str = fld("devices", choices=("devices", "samples"), doc="aggregation weights D(c)/D(p) or S(c)/S(p)")


@dataclass(frozen=True)
class QuantizerConfig:
    levels: tuple[int, ...] = fld((), lo=0, hi=32767, doc="s_1..s_N per link; 0 or 'none' = float32")
    bucket: Any = fld(512, doc="values per norm (an integer >= 0; 0 = one global norm), or 'tensor': one norm per "
                               "parameter tensor")
    kind: tuple[str, ...] = fld((), registry=CODECS, doc="codec of each link (N values); empty = qsgd on every link")
    topk_fraction: tuple[float, ...] = fld((), lo=0, hi=1, lo_open=True,
                                           doc="share of coordinates a topk link keeps, per link; empty = 0.01")
    error_feedback: tuple[bool, ...] = fld((), doc="per link: the sender adds its last residual x - Q(x) to its next "
                                                   "message (EF); empty = off")
    downlink: tuple[int, ...] = fld((), lo=0, hi=32767,
                                    doc="per link: qsgd levels of the parent's broadcast Q(v_new - v_prev) to its "
                                        "subtree; 0 or 'none' = float32 (empty = none everywhere)")
    scale: tuple[float, ...] = fld((), lo=0, doc="per link: an intsum link's scale gamma (codes = round(gamma a u)); "
                                                 "0 or empty = the largest that cannot wrap around (docs/privacy.md)")
    rotate: tuple[bool, ...] = fld((), doc="per link: an intsum link rotates updates by a random Hadamard transform "
                                           "first (shared by the group); empty = off")


@dataclass(frozen=True)
class ParticipationConfig:
    fraction: tuple[float, ...] = fld((), lo=0, hi=1, lo_open=True,
                                      doc="f_1..f_N: share of a node's children drawn at each of its aggregations; "
                                          "empty = 1 (all)")
    availability: tuple[float, ...] = fld((), lo=0, hi=1, lo_open=True,
                                          doc="p_1..p_N: probability that a child of a layer-n node is up in an "
                                              "aggregation; empty = 1")
    weighting: str = fld("renormalize", choices=WEIGHTINGS,
                         doc="weights of the participants: D(c) / sum of theirs, or unbiased D(c)/D(u)/inclusion "
                             "probability")


@dataclass(frozen=True)
class ServerConfig:
    optimizer: tuple[str, ...] = fld((), registry=SERVER_OPTIMIZERS,
                                     doc="per layer 1..N, how a node applies its decoded update; empty = avg "
                                         "everywhere")
    lr: tuple[float, ...] = fld((), lo=0, lo_open=True,
                                doc="server learning rate per layer; empty = each optimizer's default (momentum "
                                    "1, adam and yogi 0.01)")
    momentum: tuple[float, ...] = fld((), lo=0, hi=0.999999, doc="FedAvgM beta per layer; empty = 0.9")
    betas: Any = fld([], doc="adam/yogi [b1, b2] for every layer, or one pair per layer; empty = [0.9, 0.99]")
    eps: tuple[float, ...] = fld((), lo=0, lo_open=True, doc="adam/yogi eps per layer; empty = 1e-3")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = fld(0.05, lo=0, lo_open=True, doc="SGD learning rate mu")
    lr_schedule: str = fld("constant", choices=SCHEDULES, doc="learning rate per global round t: constant, step "
                           "(lr * lr_gamma^(t // lr_step_rounds)) or cosine (from lr to lr_min over the rounds)")
    lr_step_rounds: int = fld(10, lo=1, doc="step schedule: rounds between two decays")
    lr_gamma: float = fld(0.1, lo=0, hi=1, lo_open=True, doc="step schedule: decay factor")
    lr_min: float = fld(0.0, lo=0, doc="cosine schedule: final learning rate")
    momentum: float = fld(0.0, lo=0, hi=0.999999, doc="local SGD momentum (buffers reset at each local run)")
    nesterov: bool = fld(False, doc="Nesterov momentum (needs momentum > 0)")
    weight_decay: float = fld(0.0, lo=0, doc="L2 penalty added to the gradient")
    prox_mu: float = fld(0.0, lo=0, doc="FedProx: gradient + prox_mu (w - w0), w0 the start of the local run")
    batch_size: int = fld(32, lo=1, doc="minibatch size B")
    rounds: int = fld(20, lo=1, doc="global rounds T")
    seed: int = fld(0, lo=0, hi=2**63 - 1, doc="run seed")
    eval_every: int = fld(1, lo=1, doc="evaluate the cloud model every k rounds (and after the last)")
    threads: int = fld(0, lo=0, doc="torch threads per rank; 0 = SLURM_CPUS_PER_TASK or 1")
    device: str = fld("cpu", choices=("auto", "cpu", "cuda"), doc="where ranks train; auto = cuda if present")
    aggregate_on: str = fld("auto", choices=("auto", "host", "device"),
                            doc="where the aggregation's vectors and codecs live: host (numpy, compiled kernels) or "
                                "device (torch tensors on train.device: only packed messages reach the host); auto = "
                                "device on a GPU, host on the CPU. The same bits either way")
    vectorize: str = fld("auto", choices=("auto", "on", "off"),
                         doc="train a rank's devices of one edge together (torch.func.vmap); auto: models under 60 k "
                             "parameters without dropout")
    round_timeout: float = fld(0.0, lo=0, doc="seconds a global round may take before the job stops, naming the "
                               "ranks that do not respond (a stopped or hung rank); 0 = off. On SLURM, e.g. 10x "
                               "the normal round time")
    share_gpus: bool = fld(False, doc="allow more ranks per node than GPUs (ranks share GPUs round-robin)")
    memory_check: bool = fld(True, doc="refuse, before anything is allocated, a run whose estimated peak memory per "
                                       "rank exceeds what the rank has (docs/hpc.md, 'Sizing')")
    memory_limit_gb: float = fld(0.0, lo=0, doc="memory per rank the check compares with, in GiB; 0 = the cgroup "
                                                "limit or MemAvailable of the node, shared by its ranks")


@dataclass(frozen=True)
class SyntheticConfig:
    alpha: float = fld(1.0, lo=0, doc="model heterogeneity of Synthetic(alpha, beta)")
    beta: float = fld(1.0, lo=0, doc="feature heterogeneity of Synthetic(alpha, beta)")
    dim: int = fld(60, lo=1, doc="input features")
    classes: int = fld(10, lo=2, doc="classes")
    samples: int = fld(200, lo=2, doc="median samples per device (train + test)")
    size_sigma: float = fld(0.5, lo=0, doc="lognormal sigma of per-device sizes; 0 = equal")
    test_fraction: float = fld(0.2, lo=0, hi=1, lo_open=True, doc="share of each device's samples held out")


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = fld("iid", registry=PARTITIONERS, doc="how a pooled data set is split over the devices "
                    "(ignored by the generated synthetic and lstsq)")
    classes_per_device: int = fld(2, lo=1)
    alpha: float = fld(0.5, lo=0, lo_open=True, doc="Dirichlet concentration")
    size_sigma: float = fld(0.0, lo=0, doc="iid: lognormal sigma of device sizes")
    classes_per_edge: int = fld(4, lo=1, doc="edge-shards: classes in each edge's pool")
    seed: int | None = fld(None, lo=0, hi=2**63 - 1,
                           doc="seed of the data split and of the generated synthetic/lstsq data; null = "
                               "train.seed. Fix it to vary only the training noise with train.seed")


@dataclass(frozen=True)
class DataConfig:
    name: str = fld("synthetic", registry=DATASETS, doc="data set: a built-in or a plug-in f(root, train, **args)")
    root: str = fld("data", doc="local data directory (torchvision layout, or Debian's for Fashion-MNIST); arrow's "
                                "relative data.args.path is taken from it")
    download: bool = fld(False, doc="let torchvision download into root (needs internet)")
    args: Any = fld({}, doc="keyword arguments passed to the data set: a plug-in's, or arrow's path, features, label, "
                            "owner, ... (docs/api.md, 'Arrow and Parquet data sets')")
    cache_mb: float = fld(512.0, lo=0, doc="MiB per rank of drawn devices' training data kept for later rounds "
                                           "(least recently used go first); data of devices never drawn is never "
                                           "made (docs/hpc.md, 'Sizing')")
    test_devices: int = fld(0, lo=0, doc="generated data sets: the test set is the held-out part of this many "
                                         "devices spread evenly over the tree; 0 = every device")
    validation: float = fld(0.0, lo=0, hi=0.5, doc="share of the training data held out as a validation set that "
                                                    "replaces the test set in the run's evaluations (/metrics/test_* "
                                                    "then score the validation part; `optimize --search` uses it); "
                                                    "0 = off")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass(frozen=True)
class ModelConfig:
    name: str = fld("mlp", registry=MODELS, doc="model: a built-in or a plug-in f(input_shape, num_classes, **args)")
    args: Any = fld({}, doc="keyword arguments of the model function, e.g. {hidden: 200} for mlp")
    init: str = fld("seeded", choices=("seeded", "module"),
                    doc="seeded: parameters drawn from train.seed; module: the model function's own init "
                        "(rank 0's, broadcast)")


@dataclass(frozen=True)
class LatencyConfig:
    step_time: float = fld(0.01, lo=0, doc="seconds per local SGD step (deadline model)")
    uplink_rate: tuple[float, ...] = fld((), lo=0, lo_open=True, doc="bits/s of links 1..N; empty = 1e8 each")
    uplink_latency: tuple[float, ...] = fld((), lo=0, doc="seconds per message on links 1..N; empty = 0.01 each")


@dataclass(frozen=True)
class SystemConfig:
    speed: str = fld("constant", doc="factor on latency.step_time drawn once per device: constant, lognormal(sigma) "
                                     "(median 1), pareto(alpha) (>= 1, a heavy tail of slow devices) or "
                                     "uniform(lo, hi) (docs/system.md)")
    jitter: str = fld("constant", doc="factor on a device's step time drawn anew every round, the same forms")
    link_spread: tuple[str, ...] = fld((), doc="per link 1..N: factor on each child's uplink and downlink rate, drawn "
                                               "once, the same forms; empty = constant")
    down_rate: tuple[float, ...] = fld((), lo=0, doc="bits/s of the downlink of links 1..N; 0 = the model reaches "
                                                     "the children at once (the paper's); empty = 0")
    down_latency: tuple[float, ...] = fld((), lo=0, doc="seconds per downlink message on links 1..N; empty = 0")
    contention: tuple[str, ...] = fld((), choices=("none", "shared"),
                                      doc="per link: shared = the messages to one parent share its ingress "
                                          "(processor sharing); empty = none")
    ingress_rate: tuple[float, ...] = fld((), lo=0, doc="per link: bits/s of a parent's ingress under shared "
                                                        "contention; 0 = the link's uplink rate")
    device_trace: str = fld("", doc="CSV trace with columns device, step_seconds[, up_rate, down_rate]: replaces "
                                    "latency.step_time (and link 1's rates) per device; device d takes row d mod rows")
    link_trace: str = fld("", doc="CSV trace with columns link, child[, up_rate, up_latency, down_rate, "
                                  "down_latency]: the values of single children of a link")
    availability_trace: str = fld("", doc="CSV trace with columns device, online, offline: when devices are online "
                                          "(virtual seconds; unlisted devices always are). A device offline when "
                                          "its parent starts an aggregation does not take part")
    availability_period: float = fld(0.0, lo=0, doc="the availability trace repeats every this many seconds; 0 = "
                                                    "it does not (offline after a device's last interval)")
    seed: int | None = fld(None, lo=0, hi=2**63 - 1,
                           doc="seed of the system's draws (speed, jitter, link_spread); null = train.seed. Fix it "
                               "to keep one network while train.seed varies")


@dataclass(frozen=True)
class AggregationConfig:
    policy: tuple[str, ...] = fld((), registry=POLICIES,
                                  doc="per layer 1..N (cloud last): all (wait for every child), deadline, first_k or "
                                      "buffered (layers m..N only); empty = all everywhere (docs/system.md)")
    deadline: tuple[float, ...] = fld((), lo=0, doc="per layer: seconds after a node sends its model within which "
                                                    "children's messages count (> 0 on deadline layers)")
    min_children: tuple[int, ...] = fld((), lo=0, doc="per layer: a deadline layer waits past its deadline for at "
                                                      "least this many children; empty = 1")
    k: tuple[int, ...] = fld((), lo=0, doc="per layer: a first_k layer aggregates the first k arrivals (>= 1 there)")
    buffer: tuple[int, ...] = fld((), lo=0, doc="per layer: a buffered layer updates every this many arrivals (k_n, "
                                                "1 <= k_n <= its children; 0 elsewhere)")
    staleness: tuple[str, ...] = fld((), doc="per layer: a buffered layer's weight of an update its sender started "
                                             "s versions ago: constant, polynomial(a) = (1 + s)^-a or hinge(a, b); "
                                             "empty = constant")


@dataclass(frozen=True)
class MobilityConfig:
    model: str = fld("static", choices=MOBILITY_MODELS,
                     doc="how devices move between edge servers from round to round: static (never), random, "
                         "markov or trace (docs/algorithms.md, 'Devices that move')")
    p: float = fld(0.0, lo=0, hi=1, doc="random: probability that a device moves in a round")
    neighbours: str = fld("uniform", choices=NEIGHBOURS,
                          doc="random: where a device moves: any other edge (uniform), the edge before or after "
                              "it (ring), or a neighbour on a grid of ceil(sqrt(E)) columns (grid)")
    matrix: str = fld("", doc="markov: text file of E rows of E transition probabilities (rows sum to 1; spaces or "
                              "commas; # comments)")
    trace: str = fld("", doc="trace: CSV file with columns round, device, edge; a device sits under that edge "
                             "from that round on")
    seed: int | None = fld(None, lo=0, hi=2**63 - 1, doc="seed of the moves; null = train.seed")


@dataclass(frozen=True)
class FailuresConfig:
    intervals: Any = fld([], doc="outages of edge servers: [[edge, start, end], ...], down for start <= x < end; "
                                 "a fourth entry names the edge its devices join meanwhile (-1: they sit out)")
    trace: str = fld("", doc="CSV file with columns edge, start, end[, fallback]: more outages")
    unit: str = fld("rounds", choices=UNITS, doc="what start and end count: global rounds, or virtual seconds "
                                                 "(an edge is down in a round that starts inside its interval)")
    fallback: str = fld("nearest", choices=FALLBACKS,
                        doc="where the devices of a down edge go when its outage names no edge: the nearest alive "
                            "sibling (same parent, closest id) or nowhere (sit_out)")


@dataclass(frozen=True)
class PrivacyConfig:
    clip: float = fld(0.0, lo=0, doc="L2 norm C every device's update (x - v) from a local run is clipped to, before "
                                     "its codec; 0 = no privacy (docs/privacy.md)")
    noise_multiplier: float = fld(0.0, lo=0, doc="sigma: the Gaussian noise's standard deviation is sigma C (times "
                                                 "the codec's norm factor and the largest device weight at edge and "
                                                 "central placements); 0 = clipping only (epsilon = inf)")
    placement: str = fld("central", choices=("local", "edge", "central", "distributed"),
                         doc="who adds the noise: every device (local), every node of privacy.layer (edge), the "
                             "cloud (central), or every device a discrete Gaussian share under secure aggregation "
                             "on layer 1 (distributed: the shares of any privacy.secure_threshold devices add up "
                             "to the noise)")
    layer: int = fld(1, lo=1, doc="edge placement: the layer whose nodes add the noise (1..N-1)")
    delta: float = fld(0.0, lo=0, hi=0.5, doc="the delta of the reported (epsilon, delta); 0 = 1 / devices")
    target_epsilon: float = fld(0.0, lo=0, doc="stop (with a checkpoint) before a round would spend more than this "
                                               "epsilon; 0 = no budget")
    clip_quantile: float = fld(0.0, lo=0, hi=0.99, doc="adaptive clipping (Andrew et al. 2021): after every round "
                                                          "the clip moves toward this quantile of the update norms, "
                                                          "from privacy.clip; 0 = a fixed clip")
    clip_lr: float = fld(0.2, lo=0, doc="adaptive clipping's step: C <- C exp(-clip_lr (b - clip_quantile)), b the "
                                        "noised fraction of updates within C")
    clip_count_noise: float = fld(0.0, lo=0, doc="adaptive clipping: std of the Gaussian noise each noise-adding "
                                                 "party adds to its count of updates within C; must exceed "
                                                 "noise_multiplier / 2; 0 = noise_multiplier")
    secure_aggregation: tuple[bool, ...] = fld((), doc="per layer 1..N: its nodes learn only their children's sum "
                                                       "(pairwise masks; needs an intsum link; layer 1 in this "
                                                       "version); empty = off")
    secure_threshold: int = fld(1, lo=1, doc="a secure aggregation group whose survivors are fewer than this "
                                             "aborts: its node takes none of them in that aggregation; 1 = never "
                                             "(the model is then the same as without the masks)")


@dataclass(frozen=True)
class AdmmConfig:
    layer: int = fld(0, lo=0, doc="the layer whose nodes run ADMM with their children (FedADMM: each child keeps a "
                                  "dual, its subtree solves an augmented local problem and it sends its augmented "
                                  "model; docs/algorithms.md); 1 = the edges with their devices, N = the cloud; "
                                  "0 = off")
    rho: float = fld(0.1, lo=0, doc="ADMM's penalty rho > 0: the local proximal weight and the dual step")


@dataclass(frozen=True)
class OutputConfig:
    path: str = fld("results/run.h5", doc="HDF5 results file")
    checkpoint_every: int = fld(1, lo=0, doc="write the checkpoint every k global rounds; 0 = only on SIGTERM/SIGUSR1")
    keep_checkpoint: bool = fld(False, doc="keep the last checkpoint when the run completes, so that --resume with a "
                                           "larger train.rounds trains the same run longer")
    csv: bool = fld(False, doc="also log every round to a CSV file beside the results (output.path with .csv)")
    tensorboard: str = fld("", doc="directory for TensorBoard scalars; empty = off (needs the tensorboard extra)")


@dataclass(frozen=True)
class Config:
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    tau: tuple[int, ...] = fld((), lo=1, doc="tau_1..tau_N")
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    mobility: MobilityConfig = field(default_factory=MobilityConfig)
    failures: FailuresConfig = field(default_factory=FailuresConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    callbacks: Any = fld([], doc="extra callbacks: a list of 'module:attr' / 'file.py:attr' references, or "
                                 "{ref: REF, args: {...}} mappings; attr(**args) must give a qmlhfl_mpi.Callback")

    def build_tree(self) -> Tree:
        t = self.topology
        return Tree.uniform(list(t.branching)) if t.branching is not None else Tree.from_nested(t.tree)

    @property
    def N(self) -> int:
        return len(self.tau)

    def link_rates(self) -> tuple[float, ...]:
        return self.latency.uplink_rate or (1e8,) * self.N

    def link_latencies(self) -> tuple[float, ...]:
        return self.latency.uplink_latency or (0.01,) * self.N

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(dataclasses.asdict(self)), sort_keys=False)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---- generic loader --------------------------------------------------------
def _describe(f: dataclasses.Field, tp: Any) -> str:
    m = f.metadata
    parts = []
    if m.get("registry") is not None:
        return "one of " + m["registry"].choices_text()
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    base = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    inner = typing.get_args(tp)
    if typing.get_origin(tp) is tuple or (inner and typing.get_origin(inner[0]) is tuple):
        parts.append("a list of numbers")
    else:
        parts.append(base.get(tp, "a value"))
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None and not m.get("lo_open"):
        parts.append(f"from {lo:g} to {hi:g}")
    elif lo is not None:
        parts.append(("> " if m.get("lo_open") else ">= ") + f"{lo:g}")
        if hi is not None:
            parts.append(f"and <= {hi:g}")
    return " ".join(parts)


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_scalar(key: str, v: Any, tp: type, f: dataclasses.Field) -> Any:
    m = f.metadata
    bad = ConfigError(f"config key '{key}' = {v!r}: expected {_describe(f, tp)}")
    if tp is bool:
        if not isinstance(v, bool):
            raise bad
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad
    elif tp is float:
        if isinstance(v, str) and _FLOAT_RE.fullmatch(v.strip()):
            v = float(v)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad
        v = float(v)
    elif tp is str:
        if isinstance(v, bool) and m.get("choices") and {"on", "off"} <= set(m["choices"]):
            v = "on" if v else "off"  # YAML 1.1 reads a bare on/off as true/false
        if not isinstance(v, str):
            raise bad
    if m.get("choices") and v not in m["choices"]:
        raise bad
    if m.get("registry") is not None:
        try:
            m["registry"].check(v)
        except PluginError:
            raise bad from None
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (v < lo or (m.get("lo_open") and v == lo)):
        raise bad
    if hi is not None and v > hi:
        raise bad
    return v


def _convert(key: str, v: Any, tp: Any, f: dataclasses.Field) -> Any:
    if tp is Any:
        return v
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        return _convert(key, v, tp, f)
    if origin is tuple:
        elem = args[0]
        if key.endswith(("quantizer.levels", "quantizer.downlink")):
            v = [0 if isinstance(x, str) and x.lower() == "none" else x for x in (v if isinstance(v, list) else [v])]
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {v!r}: expected {_describe(f, tp)}")
        return tuple(_check_scalar(f"{key}[{i}]", x, elem, f) for i, x in enumerate(v))
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), v, key)
    return _check_scalar(key, v, tp, f)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = f"section '{prefix}'" if prefix else "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr(f'{prefix}.{k}'.lstrip('.')) for k in unknown)} in {where}; "
            f"valid keys there: {', '.join(fields)}"
        )
    kwargs = {}
    for name, val in raw.items():
        key = f"{prefix}.{name}".lstrip(".")
        kwargs[name] = _convert(key, val, hints[name], fields[name])
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (value parsed as YAML) to a raw dict."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.lr=0.1")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return raw


def from_dict(raw: Any) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate. Raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass the path of a YAML file such as configs/quickstart.yaml")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, overrides))


def load_config(source: str | Path | dict[str, Any] | Config, overrides: Sequence[str] = ()) -> Config:
    """The validated config from a YAML file path, a plain dict (as YAML would give)
    or a :class:`Config`, with ``dotted.key=value`` overrides applied.  Raises
    :class:`ConfigError` naming the key, the value and the valid range."""
    if isinstance(source, Config):
        if not overrides:
            validate(source)
            return source
        source = yaml.safe_load(source.to_yaml())
    if isinstance(source, dict):
        return from_dict(apply_overrides(source, overrides))
    assert not isinstance(source, Config)  # a Config became a dict above
    return load(source, overrides)


def validate(cfg: Config) -> None:
    """Cross-field checks (tree vs tau vs levels vs latency lengths)."""
    t = cfg.topology
    if (t.branching is None) == (t.tree is None):
        raise ConfigError(
            "topology: give exactly one of 'branching' (uniform fan-outs, cloud first, e.g. [2, 2, 4]) "
            "or 'tree' (nested lists, e.g. [[3, 2], [4]])"
        )
    try:  # counted, not built: a tree of 10^10 devices is for the memory check to refuse, not to allocate
        shape = TreeShape.of(t.branching, t.tree)
    except TopologyError as e:
        raise ConfigError(str(e)) from None
    N = len(shape.nodes) - 1
    if len(cfg.tau) != N:
        raise ConfigError(f"config key 'tau' = {list(cfg.tau)}: the tree has N={N} layers, so give {N} values "
                          f"tau_1..tau_{N}, each >= 1")
    if len(cfg.quantizer.levels) != N:
        raise ConfigError(
            f"config key 'quantizer.levels' = {list(cfg.quantizer.levels)}: the tree has N={N} links, "
            f"so give {N} values s_1..s_{N} (0 or 'none' = float32)"
        )
    for key in ("uplink_rate", "uplink_latency"):
        vals = getattr(cfg.latency, key)
        if vals and len(vals) != N:
            raise ConfigError(f"config key 'latency.{key}' = {list(vals)}: give {N} values (links 1..{N}) or leave it empty")
    _validate_links(cfg, N)
    if cfg.quantizer.kind and len(cfg.quantizer.kind) != N:
        raise ConfigError(f"config key 'quantizer.kind' = {list(cfg.quantizer.kind)}: give {N} codecs (links 1..{N}) "
                          f"or leave it empty for qsgd on every link; valid: {CODECS.choices_text()}")
    for key, value in (("model.args", cfg.model.args), ("data.args", cfg.data.args)):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a mapping of argument names to values, "
                              "e.g. {hidden: 200}")
    _validate_system(cfg, N)
    validate_moves(cfg, shape.nodes[1])
    validate_privacy(cfg, N)
    validate_secure_aggregation(cfg, N, shape)
    validate_admm(cfg)
    callback_specs(cfg.callbacks)


def _validate_system(cfg: Config, N: int) -> None:
    """The ``system`` and ``aggregation`` sections: lengths, distributions, each policy's parameters."""
    s, a = cfg.system, cfg.aggregation
    lists = {"system.link_spread": s.link_spread, "system.down_rate": s.down_rate,
             "system.down_latency": s.down_latency, "system.contention": s.contention,
             "system.ingress_rate": s.ingress_rate, "aggregation.policy": a.policy,
             "aggregation.deadline": a.deadline, "aggregation.min_children": a.min_children, "aggregation.k": a.k,
             "aggregation.buffer": a.buffer, "aggregation.staleness": a.staleness}
    for key, vals in lists.items():
        if vals and len(vals) != N:
            raise ConfigError(f"config key '{key}' = {list(vals)}: the tree has N={N} layers, so give {N} values "
                              f"(links/layers 1..{N}, cloud last) or leave it empty")
    try:
        system_distributions(cfg)
    except TraceError as e:
        raise ConfigError(str(e)) from None
    for n, name in enumerate(a.policy):
        if name == "deadline" and not (a.deadline and a.deadline[n] > 0):
            raise ConfigError(f"config key 'aggregation.deadline' = {list(a.deadline)}: layer {n + 1} has policy "
                              f"deadline, so give it a deadline > 0 seconds (entry {n + 1} of {N})")
        if name == "first_k" and not (a.k and a.k[n] >= 1):
            raise ConfigError(f"config key 'aggregation.k' = {list(a.k)}: layer {n + 1} has policy first_k, so give "
                              f"it k >= 1 children (entry {n + 1} of {N})")
    validate_buffered(cfg, N)
    if s.availability_period and not s.availability_trace:
        raise ConfigError(f"config key 'system.availability_period' = {s.availability_period:g} repeats an "
                          "availability trace, but system.availability_trace is empty; give the trace or drop the "
                          "period")


def system_distributions(cfg: Config) -> tuple[Distribution, Distribution, tuple[Distribution, ...]]:
    """``(speed, jitter, per-link spread)`` of the ``system`` section; raises :class:`TraceError`."""
    s = cfg.system
    return (Distribution.parse(s.speed, "system.speed"), Distribution.parse(s.jitter, "system.jitter"),
            tuple(Distribution.parse(x, f"system.link_spread[{n}]") for n, x in enumerate(s.link_spread)))


def _validate_links(cfg: Config, N: int) -> None:
    """The per-link and per-layer lists: N values or empty; bucket; betas; combinations."""
    lists = {"quantizer.topk_fraction": cfg.quantizer.topk_fraction,
             "quantizer.error_feedback": cfg.quantizer.error_feedback, "quantizer.downlink": cfg.quantizer.downlink,
             "participation.fraction": cfg.participation.fraction,
             "participation.availability": cfg.participation.availability,
             "server.optimizer": cfg.server.optimizer, "server.lr": cfg.server.lr,
             "server.momentum": cfg.server.momentum, "server.eps": cfg.server.eps,
             "quantizer.scale": cfg.quantizer.scale, "quantizer.rotate": cfg.quantizer.rotate,
             "privacy.secure_aggregation": cfg.privacy.secure_aggregation}
    for key, vals in lists.items():
        if vals and len(vals) != N:
            raise ConfigError(f"config key '{key}' = {list(vals)}: the tree has N={N} layers, so give {N} values "
                              f"(one per link/layer 1..{N}) or leave it empty")
    b = cfg.quantizer.bucket
    if not (b == "tensor" or (isinstance(b, int) and not isinstance(b, bool) and b >= 0)):
        raise ConfigError(f"config key 'quantizer.bucket' = {b!r}: expected an integer >= 0 (values per norm; 0 = one "
                          "global norm) or 'tensor' (one norm per parameter tensor)")
    server_betas(cfg.server.betas, N)
    t = cfg.train
    if t.lr_schedule == "cosine" and t.lr_min > t.lr:
        raise ConfigError(f"config key 'train.lr_min' = {t.lr_min:g}: the cosine schedule goes from train.lr = "
                          f"{t.lr:g} down to lr_min, so give 0 <= lr_min <= {t.lr:g}")
    if t.nesterov and t.momentum == 0:
        raise ConfigError("config key 'train.nesterov' = true needs train.momentum > 0 (e.g. --set train.momentum=0.9)")
    levels = cfg.quantizer.levels
    kinds = cfg.quantizer.kind or ("qsgd",) * N
    for n, ef in enumerate(cfg.quantizer.error_feedback):
        if ef and (kinds[n] == "none" or (kinds[n] in ("qsgd", "round") and levels[n] == 0)):
            raise ConfigError(f"config key 'quantizer.error_feedback[{n}]' = true on link {n + 1}, which sends "
                              f"float32 (kind {kinds[n]!r}, levels {levels[n]}): there is no error to feed back; "
                              "set it to false or quantize the link")


def server_betas(raw: Any, N: int) -> list[tuple[float, float]]:
    """``server.betas`` as one ``(b1, b2)`` pair per layer; raises :class:`ConfigError`."""
    bad = ConfigError(f"config key 'server.betas' = {raw!r}: expected [b1, b2] with 0 <= b < 1 for every layer, or "
                      f"{N} such pairs (one per layer), or nothing for [0.9, 0.99]")
    if raw is None or (isinstance(raw, (list, tuple)) and len(raw) == 0):
        return [(0.9, 0.99)] * N
    if not isinstance(raw, (list, tuple)):
        raise bad
    pairs = [raw] * N if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw) else list(raw)
    if len(pairs) != N:
        raise bad
    out = []
    for p in pairs:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in p)):
            raise bad
        out.append((float(p[0]), float(p[1])))
    return out


def callback_specs(raw: Any) -> list[tuple[str, dict[str, Any]]]:
    """``callbacks`` as ``(reference, args)`` pairs; raises :class:`ConfigError` on a bad entry."""
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"config key 'callbacks' = {raw!r}: expected a list of references such as "
                          "['examples/callbacks.py:BestAccuracy'] or of {ref: ..., args: {...}} mappings")
    out: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(raw):
        args: Any
        ref, args = (item, {}) if isinstance(item, str) else (None, None)
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"ref", "args"})
            ref, args = item.get("ref"), item.get("args", {})
            if unknown:
                raise ConfigError(f"config key 'callbacks[{i}]' has unknown key(s) {unknown}; valid: ref, args")
        if not isinstance(ref, str) or ":" not in ref or not isinstance(args, dict):
            raise ConfigError(f"config key 'callbacks[{i}]' = {item!r}: expected 'module:attr' or 'file.py:attr', "
                              "or {ref: 'module:attr', args: {...}}")
        out.append((ref, dict(args)))
    return out


# keys naming files whose contents change results (traces, matrices): a checkpoint keeps their SHA-256
INPUT_FILE_KEYS = ("system.device_trace", "system.link_trace", "system.availability_trace", "mobility.matrix",
                   "mobility.trace", "failures.trace")


def input_files(cfg: Config) -> dict[str, str]:
    """``{key: path}`` of the :data:`INPUT_FILE_KEYS` the config sets."""
    flat = flatten(yaml.safe_load(cfg.to_yaml()))
    return {k: str(flat[k]) for k in INPUT_FILE_KEYS if flat.get(k)}


# keys that may change between a checkpoint and its resumption: they do not
# change the trained model or the recorded metrics
RESUME_FREE_KEYS = ("output.path", "output.checkpoint_every", "output.keep_checkpoint", "output.csv",
                    "output.tensorboard", "train.rounds",
                    "privacy.target_epsilon",
                    "train.threads", "train.share_gpus", "train.round_timeout", "train.memory_check",
                    "train.memory_limit_gb", "callbacks")


def flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to ``{dotted.key: value}``; lists stay values."""
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: x}


def config_diff(old_yaml: str, new: Config) -> list[str]:
    """``key: old -> new`` for every key (but :data:`RESUME_FREE_KEYS`) that differs.  A key the old config
    lacks (written by a version before the key existed) counts as its default, which is what that version
    did: new sections are off by default."""
    defaults = flatten(yaml.safe_load(Config().to_yaml()))
    old = {**defaults, **flatten(yaml.safe_load(old_yaml) or {})}
    cur = flatten(yaml.safe_load(new.to_yaml()))
    keys = sorted((set(old) | set(cur)) - set(RESUME_FREE_KEYS))
    return [f"{k}: {old.get(k)!r} -> {cur.get(k)!r}" for k in keys if old.get(k) != cur.get(k)]


def schema() -> list[tuple[str, Any, dataclasses.Field]]:
    """All leaf keys as ``(dotted key, type, field)``; used by docs and fault tests."""
    out: list[tuple[str, Any, dataclasses.Field]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(typing.cast(type, tp), f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", tp, f))

    walk(Config, "")
    return out
