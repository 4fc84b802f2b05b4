"""Validation of the config sections of the third stage: ``mobility:``, ``failures:``, ``buffered`` aggregation
layers (docs/algorithms.md) and ``privacy:`` (docs/privacy.md).  Called by :func:`.schema.validate`; raises
:class:`~.errors.ConfigError`."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..core.asynchrony import Staleness
from ..core.codecs.intsum import code_length
from ..core.participation import sample_size
from ..core.topology import TreeShape
from .errors import ConfigError

if TYPE_CHECKING:
    from .schema import Config

__all__ = ["check_modulus", "int_scales", "validate_admm", "noise_layer", "outages", "validate_buffered", "validate_moves",
           "validate_privacy", "validate_secure_aggregation"]


def validate_moves(cfg: Config, edges: int) -> None:
    """The ``mobility`` and ``failures`` sections: each model's file, the outages' shape and edge ids."""
    m = cfg.mobility
    for model, key in (("markov", "matrix"), ("trace", "trace")):
        given = bool(getattr(m, key))
        if (m.model == model) != given:
            raise ConfigError(f"config key 'mobility.{key}' = {getattr(m, key)!r} with mobility.model = "
                              f"{m.model!r}: " + (f"the {model} model needs its file" if not given else
                                                  f"only the {model} model reads it; set mobility.model: {model} "
                                                  "or drop the key"))
    if m.model == "random" and not m.p > 0:
        raise ConfigError("config key 'mobility.p' = 0 with mobility.model = 'random': nobody would move; give a "
                          "probability 0 < p <= 1, or use mobility.model: static")
    outages(cfg.failures.intervals, edges)


def outages(raw: Any, edges: int, key: str = "failures.intervals") -> list[tuple[int, float, float, int | None]]:
    """``failures.intervals`` (or a trace's rows) as ``(edge, start, end, fallback or None)``; raises
    :class:`ConfigError` naming the entry."""
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"config key '{key}' = {raw!r}: expected a list of [edge, start, end] or [edge, start, "
                          "end, fallback] entries")
    out = []
    for i, row in enumerate(raw):
        ok = isinstance(row, (list, tuple)) and len(row) in (3, 4) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row)
        if ok:
            edge, start, end = int(row[0]), float(row[1]), float(row[2])
            fallback = int(row[3]) if len(row) == 4 else None
            ok = row[0] == edge and (len(row) == 3 or row[3] == fallback) and 0 <= start < end
        if not ok:
            raise ConfigError(f"config key '{key}[{i}]' = {row!r}: expected [edge, start, end] or [edge, start, end, "
                              "fallback] with integer edge ids and 0 <= start < end")
        if not 0 <= edge < edges:
            raise ConfigError(f"config key '{key}[{i}]' = {list(row)}: edge server {edge} out of range; the tree "
                              f"has {edges} edge servers (0..{edges - 1})")
        if fallback is not None and not (-1 <= fallback < edges and fallback != edge):
            raise ConfigError(f"config key '{key}[{i}]' = {list(row)}: fallback {fallback} must be another edge "
                              f"server (0..{edges - 1}) or -1 (its devices sit out)")
        out.append((edge, start, end, fallback))
    return out


def validate_buffered(cfg: Config, N: int) -> None:
    """``buffered`` layers: a top segment ``m..N``, each with a buffer of 1..its children and a staleness
    function, every child busy (no sampling there), float32 models down those links, a fixed tree."""
    a = cfg.aggregation
    for n, text in enumerate(a.staleness):
        try:
            Staleness(text)
        except ValueError as e:
            raise ConfigError(f"config key 'aggregation.staleness[{n}]' = {text!r}: {e}") from None
    layers = [n for n, name in enumerate(a.policy, start=1) if name == "buffered"]
    if not layers:
        return
    m = layers[0]
    if layers != list(range(m, N + 1)):
        raise ConfigError(f"config key 'aggregation.policy' = {list(a.policy)}: the buffered layers must be a top "
                          f"segment m..N (a buffered node works for a buffered parent), here layers {layers}; make "
                          f"layers {m}..{N} buffered or use a synchronous policy above the last buffered layer")
    shape = TreeShape.of(cfg.topology.branching, cfg.topology.tree)
    for n in layers:
        children = shape.max_children[n]
        k = a.buffer[n - 1] if a.buffer else 0
        if not 1 <= k <= children:
            raise ConfigError(f"config key 'aggregation.buffer' = {list(a.buffer)}: a buffered layer-{n} node needs "
                              f"1 <= k <= {children} (its children); entry {n} is {k}")
        if shape.min_children[n] < k:
            raise ConfigError(f"config key 'aggregation.buffer' = {list(a.buffer)}: the smallest layer-{n} node has "
                              f"{shape.min_children[n]} child(ren), fewer than its buffer k = {k}, so it would never "
                              f"update; give 1 <= k <= {shape.min_children[n]}")
    p, q = cfg.participation, cfg.quantizer
    for n in layers:
        if (p.fraction and p.fraction[n - 1] < 1) or (p.availability and p.availability[n - 1] < 1):
            raise ConfigError("config key 'participation.fraction'/'availability': a buffered layer keeps every "
                              f"child busy, so give 1 for layer {n} (sample below layer {m} instead)")
        if q.downlink and q.downlink[n - 1]:
            raise ConfigError(f"config key 'quantizer.downlink' = {list(q.downlink)}: a buffered layer sends its "
                              f"model to each child when the child starts a job, in float32; give 0 for link {n}")
    if m == 1 and cfg.system.availability_trace:
        raise ConfigError("config key 'system.availability_trace' with buffered edges over devices (layer 1): a "
                          "job of an offline device would send nothing; buffer from layer 2 up instead")
    if cfg.mobility.model != "static" or cfg.failures.intervals or cfg.failures.trace:
        raise ConfigError("config section 'mobility'/'failures' with a buffered layer: this version moves "
                          "devices between synchronous rounds only; use synchronous policies")


def noise_layer(cfg: Config, N: int) -> int:
    """The layer that adds the privacy noise: 0 (each device), ``privacy.layer`` (edge) or ``N`` (the cloud)."""
    p = cfg.privacy
    return {"local": 0, "edge": p.layer, "central": N, "distributed": 1}[p.placement]


def validate_privacy(cfg: Config, N: int) -> None:
    """The ``privacy`` section: a clip for any noise or budget, a noise layer inside the tree, and below an edge
    or central noise layer what keeps one device's share of the noised sum within ``2 C kappa omega``: one
    local run per noised sum, no error feedback, plain averaging, lossless links above link 1."""
    p, q, s = cfg.privacy, cfg.quantizer, cfg.server
    if not p.clip > 0:
        if p.noise_multiplier or p.target_epsilon:
            raise ConfigError(f"config key 'privacy.clip' = {p.clip:g}: privacy.noise_multiplier and "
                              "privacy.target_epsilon need a clip norm C > 0 (the noise is calibrated to it); give "
                              "e.g. privacy.clip: 1.0")
        return
    if p.target_epsilon and not p.noise_multiplier > 0:
        raise ConfigError(f"config key 'privacy.target_epsilon' = {p.target_epsilon:g}: without noise "
                          "(privacy.noise_multiplier 0) every round spends an infinite epsilon; give a noise "
                          "multiplier > 0 or drop the target")
    if p.placement == "edge" and not 1 <= p.layer <= N - 1:
        raise ConfigError(f"config key 'privacy.layer' = {p.layer}: the edge placement adds noise at a layer "
                          f"between the devices and the cloud, 1..{N - 1}" +
                          ("; a tree with N = 1 has none: use privacy.placement: central" if N == 1 else ""))
    if p.clip_quantile:
        kinds = q.kind or ("qsgd",) * N
        if "intsum" in kinds:
            raise ConfigError(f"config key 'privacy.clip_quantile' = {p.clip_quantile:g} with quantizer.kind = "
                              f"{list(kinds)}: intsum's scale is fixed from privacy.clip, and a clip that grows would "
                              "wrap its sums around; use a fixed clip (clip_quantile: 0) with intsum")
        if not p.clip_lr > 0:
            raise ConfigError(f"config key 'privacy.clip_lr' = {p.clip_lr:g}: adaptive clipping needs a step > 0 "
                              "(e.g. 0.2)")
        sigma_b = p.clip_count_noise or p.noise_multiplier
        if p.noise_multiplier and not 2 * sigma_b > p.noise_multiplier:
            raise ConfigError(f"config key 'privacy.clip_count_noise' = {p.clip_count_noise:g}: the count's noise must "
                              f"exceed privacy.noise_multiplier / 2 = {p.noise_multiplier / 2:g}, or the count alone "
                              "spends the whole budget; give a larger value, or 0 (= noise_multiplier)")
    if p.placement == "distributed":
        kinds = q.kind or ("qsgd",) * N
        if kinds[0] != "intsum" or not (p.secure_aggregation and p.secure_aggregation[0]):
            raise ConfigError(f"config key 'privacy.placement' = distributed: the devices' discrete Gaussian shares "
                              "add up to the noise only in a masked integer sum, and an edge that sees single "
                              f"messages learns each share (quantizer.kind = {list(kinds)}, "
                              f"privacy.secure_aggregation = {list(p.secure_aggregation)}); give quantizer.kind "
                              "intsum on link 1 and privacy.secure_aggregation: [true, ...]")
    L = noise_layer(cfg, N)
    where = f"privacy.placement {p.placement}" + (f" at layer {L}" if p.placement == "edge" else "")
    if "buffered" in cfg.aggregation.policy:
        raise ConfigError(f"config section 'privacy' with buffered layers (aggregation.policy = "
                          f"{list(cfg.aggregation.policy)}): this version accounts synchronous rounds only; use "
                          "synchronous policies")
    if cfg.mobility.model != "static" or cfg.failures.intervals or cfg.failures.trace:
        raise ConfigError("config section 'privacy' with mobility/failures: this version accounts a fixed tree "
                          "(each device under one edge of fixed size); drop the mobility and failures sections")
    if L == 0:
        return
    bad_tau = [n for n in range(2, L + 1) if cfg.tau[n - 1] != 1]
    if bad_tau:
        raise ConfigError(f"config key 'tau' = {list(cfg.tau)} with {where}: a device must take part once in each "
                          f"noised sum, so tau_2..tau_{L} must be 1 (the layers up to the noise aggregate once); "
                          f"set tau_{bad_tau[0]} = 1, or add the noise lower (privacy.placement: edge, "
                          "privacy.layer: 1) or at the devices (local)")
    ef = [n for n in range(1, L + 1) if q.error_feedback and q.error_feedback[n - 1]]
    if ef:
        raise ConfigError(f"config key 'quantizer.error_feedback' = {list(q.error_feedback)} with {where}: a residual "
                          f"carries un-noised updates into later messages; switch it off on links 1..{L} (link "
                          f"{ef[0]} has it)")
    opt = [n for n in range(1, L) if s.optimizer and s.optimizer[n - 1] != "avg"]
    if opt:
        raise ConfigError(f"config key 'server.optimizer' = {list(s.optimizer)} with {where}: a server optimiser's "
                          f"state below the noise carries un-noised updates; use avg on layers 1..{L - 1} (layer "
                          f"{opt[0]})")


def _group_bound(cfg: Config, shape: TreeShape) -> tuple[int, float]:
    """The largest group of an intsum link 1 (children of an edge that take part) and the most its weights can
    add up to (1 when they are renormalised over the participants)."""
    m = shape.max_children[1]
    if cfg.participation.fraction:
        m = sample_size(cfg.participation.fraction[0], m)
    return m, 1.0 if cfg.participation.weighting == "renormalize" else float(shape.max_children[1])


TAIL = 8.0  # distributed DP: the noise of a group's sum kept within TAIL standard deviations of the modulus


def noise_headroom(cfg: Config, shape: TreeShape) -> float:
    """Distributed DP: the most standard deviations of the noise in a group's sum per unit of ``sigma Delta``,
    ``TAIL sqrt(m / t)`` (``m`` the largest group, ``t`` the fewest shares); 0 for any other placement."""
    p = cfg.privacy
    if p.placement != "distributed" or not p.noise_multiplier > 0:
        return 0.0
    m, _ = _group_bound(cfg, shape)
    return TAIL * p.noise_multiplier * math.sqrt(m / p.secure_threshold)


def int_scales(cfg: Config, shape: TreeShape, dim: int = 0) -> tuple[float, ...]:
    """Per link, the scale of an ``intsum`` link: ``quantizer.scale``, or (0) the largest ``gamma`` with
    ``gamma C A + m + h (gamma C + sqrt(d')) <= 2^(b-1) - 1``: no group's sum wraps around (docs/privacy.md;
    ``h`` the :func:`noise_headroom` of distributed DP, ``d'`` the codes of a ``dim``-parameter model)."""
    q, N = cfg.quantizer, len(shape.nodes) - 1
    kinds = q.kind or ("qsgd",) * N
    out = []
    for n in range(N):
        given = q.scale[n] if q.scale else 0.0
        if kinds[n] != "intsum" or given:
            out.append(given or 1.0)
            continue
        m, A = _group_bound(cfg, shape)
        h = noise_headroom(cfg, shape)
        codes = code_length(dim, bool(q.rotate and q.rotate[n]))
        room = (1 << (q.levels[n] - 1)) - 1 - m - h * math.sqrt(codes)
        out.append(room / (cfg.privacy.clip * (A + h)) if room > 0 and cfg.privacy.clip > 0 else 0.0)
    return tuple(out)


def check_modulus(cfg: Config, shape: TreeShape, gamma: float, dim: int) -> None:
    """Raise :class:`ConfigError` when a group's sum on intsum link 1 may wrap around mod ``2^b``: its codes reach
    ``gamma C A + m`` (plus, distributed, ``h (gamma C + sqrt(d'))`` of noise; ``dim`` 0: before the model is
    known)."""
    q, p = cfg.quantizer, cfg.privacy
    b = q.levels[0]
    m, A = _group_bound(cfg, shape)
    h = noise_headroom(cfg, shape)
    top = (1 << (b - 1)) - 1
    codes = code_length(dim, bool(q.rotate and q.rotate[0]))
    reach = gamma * p.clip * A + m + h * (gamma * p.clip + math.sqrt(codes))
    if not gamma > 0 or reach > top + 1e-9 * top:  # (the largest scale that fits reaches top, rounded)
        noise = f" + {TAIL:g} standard deviations of the distributed noise" if h else ""
        raise ConfigError(
            f"config key 'quantizer.levels' = {list(q.levels)}: a modulus of 2^{b} is too small for a group's sum: "
            f"with {m} children, clip C = {p.clip:g}, weights adding up to {A:g} and scale gamma = {gamma:.6g}"
            f"{' (none > 0 fits)' if not gamma > 0 else ''}, codes may reach gamma C A + m{noise} = {reach:.6g} > "
            f"2^{b - 1} - 1 = {top}; give more bits, a smaller quantizer.scale (0: the largest that fits) or a smaller "
            "clip")


def validate_secure_aggregation(cfg: Config, N: int, shape: TreeShape) -> None:
    """An ``intsum`` link (link 1, clipped updates, no error feedback, a modulus that holds the group's sum) and
    ``privacy.secure_aggregation`` (over an intsum link, groups of two or more)."""
    q, p = cfg.quantizer, cfg.privacy
    kinds = q.kind or ("qsgd",) * N
    for n, kind in enumerate(kinds, start=1):
        if kind != "intsum":
            continue
        if n != 1:
            raise ConfigError(f"config key 'quantizer.kind' = {list(kinds)}: intsum on link {n}; this version sums "
                              "integer codes of the devices' clipped updates only: use it on link 1")
        if not p.clip > 0:
            raise ConfigError("config key 'quantizer.kind' = intsum on link 1 needs privacy.clip > 0: the clip "
                              "bounds the codes, so the group's sum cannot wrap around; give e.g. privacy.clip: 1.0")
        if q.error_feedback and q.error_feedback[0]:
            raise ConfigError("config key 'quantizer.error_feedback' with intsum on link 1: the parent only learns "
                              "the group's sum, so a child's residual is not defined; switch it off on link 1")
        b = q.levels[0]
        if not 2 <= b <= 32:
            raise ConfigError(f"config key 'quantizer.levels' = {list(q.levels)}: intsum on link 1 takes its bits b "
                              "there, 2 <= b <= 32 (e.g. 16)")
        check_modulus(cfg, shape, int_scales(cfg, shape)[0], 0)
    for n, on in enumerate(p.secure_aggregation, start=1):
        if not on:
            continue
        if n != 1 or kinds[0] != "intsum":
            raise ConfigError(f"config key 'privacy.secure_aggregation' = {list(p.secure_aggregation)}: layer {n} "
                              "needs its children to send intsum codes; this version masks layer 1 over "
                              "quantizer.kind intsum on link 1")
        least = shape.min_children[1]
        if cfg.participation.fraction:
            least = sample_size(cfg.participation.fraction[0], least)
        if least < 2:
            raise ConfigError(f"config key 'privacy.secure_aggregation' on layer 1: an edge aggregates {least} child "
                              "in some aggregation, and a group of one reveals its member's update to the parent; "
                              "give every edge two or more participants (topology, participation.fraction)")
        if p.secure_threshold > least:
            raise ConfigError(f"config key 'privacy.secure_threshold' = {p.secure_threshold}: the smallest key group "
                              f"has {least} members, so its edge's aggregations would always abort; give "
                              f"1 <= secure_threshold <= {least}")



def validate_admm(cfg: Config) -> None:
    """The ``admm`` section: a layer 1..N, a penalty > 0, and none of the options that would change a device's
    local problem or its message otherwise."""
    a = cfg.admm
    if not a.layer:
        return
    N = cfg.N
    if not 1 <= a.layer <= N:
        raise ConfigError(f"config key 'admm.layer' = {a.layer}: the tree has layers 1..{N} (1 = the edges with "
                          f"their devices, {N} = the cloud); give one of them, or 0 for averaging")
    down = cfg.system.down_rate
    if a.layer > 1 and any(r > 0 for r in down[:a.layer - 1]):
        raise ConfigError(f"config key 'admm.layer' = {a.layer} with system.down_rate = {list(down)}: a child's anchor "
                          "travels down its subtree beside the model, and the virtual clock does not time it; set "
                          f"system.down_rate to 0 on links 1..{a.layer - 1}")
    if not a.rho > 0:
        raise ConfigError(f"config key 'admm.rho' = {a.rho:g}: ADMM's penalty must be > 0 (e.g. 0.1)")
    clash = [(cond, what, fix) for cond, what, fix in (
        (cfg.train.prox_mu > 0, f"train.prox_mu = {cfg.train.prox_mu:g}", "ADMM's local problem has its own "
         "proximal term (rho): set train.prox_mu: 0"),
        (cfg.train.vectorize == "on", "train.vectorize = on", "each device's proximal anchor differs, so ADMM "
         "trains one device at a time: set train.vectorize: auto or off"),
        (cfg.privacy.clip > 0, f"privacy.clip = {cfg.privacy.clip:g}", "the dual carries un-noised updates into "
         "later messages: drop the privacy section"),
        (bool(cfg.aggregation.policy) and "buffered" in cfg.aggregation.policy[:a.layer],
         f"a buffered layer at or below {a.layer}", f"ADMM's layer and those below it aggregate synchronously: use "
         f"synchronous policies on layers 1..{a.layer}"),
        (cfg.mobility.model != "static" or bool(cfg.failures.intervals) or bool(cfg.failures.trace),
         "mobility/failures", "a dual belongs to its child's place in the tree: drop the mobility and failures "
         "sections"),
    ) if cond]
    if clash:
        _, what, fix = clash[0]
        raise ConfigError(f"config key 'admm.layer' = {a.layer} with {what}: {fix}")
