"""The system model's inputs (pure): speed distributions, trace files and availability in time.

Everything random is drawn from keyed streams (:mod:`.rng`, purpose ``SYSTEM``), so every rank builds the
same system and computes the same clock:

* a device's speed factor, once: ``(seed, SYSTEM, SPEED)``, one draw per device in device order;
* its jitter in round ``t``: a counter-based draw keyed ``(seed, SYSTEM, JITTER, t)`` at counters ``2d`` and
  ``2d + 1`` (:func:`~.codecs.stream.uniforms_at`), so only the devices that train are drawn;
* the rate factor of the children of link ``n``, once: ``(seed, SYSTEM, LINK, n)``.

A distribution is written as text (``constant``, ``lognormal(sigma)``, ``pareto(alpha)``,
``uniform(lo, hi)``) and gives a positive factor from two uniforms; docs/system.md lists the families and the
trace formats (after FedScale's device-capacity and behaviour traces).
"""
from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import rng
from .codecs.stream import key_words, uniforms_at

__all__ = ["DISTRIBUTIONS", "Availability", "DeviceTrace", "Distribution", "LinkTrace", "SystemSpec", "TraceError",
           "jitter_factors", "once_factors", "read_table"]


class TraceError(ValueError):
    """A distribution, trace file or system value that cannot be used; the message names the key and the fix."""


Sampler = Callable[[tuple[float, ...], np.ndarray, np.ndarray], np.ndarray]


def _lognormal(a: tuple[float, ...], u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    return np.exp(a[0] * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))  # median 1 (Box-Muller)


def _pareto(a: tuple[float, ...], u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    return u1 ** (-1.0 / a[0])  # x_m = 1: never faster than the base, heavy tail of slow ones


def _uniform(a: tuple[float, ...], u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    return a[0] + (a[1] - a[0]) * u1


def _constant(a: tuple[float, ...], u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    return np.ones(len(u1))


# name -> (its parameters, the valid range in words, the check, the sampler): the families a factor is drawn from
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], str, Callable[[tuple[float, ...]], bool], Sampler]] = {
    "constant": ((), "", lambda a: True, _constant),
    "lognormal": (("sigma",), "sigma >= 0", lambda a: a[0] >= 0, _lognormal),
    "pareto": (("alpha",), "alpha > 0", lambda a: a[0] > 0, _pareto),
    "uniform": (("lo", "hi"), "0 < lo <= hi", lambda a: 0 < a[0] <= a[1], _uniform),
}

_SPEC = re.compile(r"\s*([a-z_]+)\s*(?:\(([^()]*)\))?\s*")


@dataclass(frozen=True)
class Distribution:
    """A positive factor's distribution (see the module doc)."""

    name: str = "constant"
    args: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str, key: str) -> Distribution:
        """``constant``, ``lognormal(0.5)``, ``pareto(2)``, ``uniform(0.5, 2)``; raises :class:`TraceError`
        naming ``key``."""
        forms = ", ".join(f"{n}({', '.join(p)})" if p else n for n, (p, *_rest) in DISTRIBUTIONS.items())
        m = _SPEC.fullmatch(str(text))
        if not m or m.group(1) not in DISTRIBUTIONS:
            raise TraceError(f"config key '{key}' = {text!r}: expected one of {forms}")
        params, valid, check, _ = DISTRIBUTIONS[m.group(1)]
        try:
            args = tuple(float(x) for x in m.group(2).split(",")) if m.group(2) and m.group(2).strip() else ()
        except ValueError:
            args = (math.nan,)
        if len(args) != len(params) or not all(math.isfinite(a) for a in args) or not check(args):
            raise TraceError(f"config key '{key}' = {text!r}: {m.group(1)} takes "
                             f"{len(params)} number(s) ({', '.join(params) or 'none'}){', with ' + valid if valid else ''}"
                             f"; e.g. {forms}")
        return cls(m.group(1), args)

    @property
    def constant(self) -> bool:
        return self.name == "constant" or (self.name == "lognormal" and self.args[0] == 0)

    def factors(self, u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
        """Factors (float64) from uniforms ``u1`` in (0, 1] and ``u2`` in [0, 1)."""
        return DISTRIBUTIONS[self.name][3](self.args, u1, u2)

    def __str__(self) -> str:
        return f"{self.name}({', '.join(f'{a:g}' for a in self.args)})" if self.args else self.name


def once_factors(dist: Distribution, key: Sequence[int], count: int) -> np.ndarray:
    """``count`` factors drawn once from the stream ``key`` (ones when ``dist`` is constant)."""
    if dist.constant:
        return np.ones(count)
    g = rng.generator(key)
    u = g.random((2, count))
    return dist.factors(1.0 - u[0], u[1])


def jitter_factors(dist: Distribution, seed: int, round_: int, devices: np.ndarray) -> np.ndarray:
    """The per-round factors of ``devices`` in round ``round_`` (counter-based: only these devices are drawn)."""
    devices = np.asarray(devices, dtype=np.int64)
    if dist.constant or len(devices) == 0:
        return np.ones(len(devices))
    k0, k1 = key_words((seed, rng.SYSTEM, rng.JITTER, round_))
    half = 2.0 ** -25  # the 24-bit draws moved to the middle of their cells: in (0, 1), never 0
    u1 = uniforms_at(k0, k1, 2 * devices).astype(np.float64) + half
    u2 = uniforms_at(k0, k1, 2 * devices + 1).astype(np.float64) + half
    return dist.factors(u1, u2)


# ---- trace files ---------------------------------------------------------------------------------------------
def read_table(path: str, key: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A CSV file with a header row: the ``required`` columns and any of the ``optional`` ones, as float64 arrays
    (an empty optional cell is NaN).  Raises :class:`TraceError` naming ``key``, the file and the line."""
    where = f"config key '{key}' = {path!r}"
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"{where}: no such file; give the path of a CSV trace (docs/system.md, 'Trace formats'), "
                         "e.g. one written by `qmlhfl-mpi traces`")
    try:
        with p.open(newline="") as fh:
            rows = [r for r in csv.reader(line for line in fh if not line.lstrip().startswith("#")) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TraceError(f"{where}: cannot be read as CSV text ({e})") from None
    if not rows:
        raise TraceError(f"{where}: the file is empty; it needs a header row ({', '.join(required)}) and data rows")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in required if c not in header]
    unknown = [c for c in header if c not in (*required, *optional)]
    if missing or unknown:
        raise TraceError(f"{where}: header {header}: " + (f"missing column(s) {missing}" if missing else
                         f"unknown column(s) {unknown}") + f"; expected {list(required)} and optionally "
                         f"{list(optional)}")
    if len(rows) == 1:
        raise TraceError(f"{where}: the header has no data rows below it")
    out = {c: np.empty(len(rows) - 1) for c in header}
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise TraceError(f"{where}: line {i} has {len(row)} fields, the header {len(header)}")
        for c, cell in zip(header, row):
            text = cell.strip()
            if not text and c in optional:
                out[c][i - 2] = math.nan
                continue
            try:
                v = float(text)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                raise TraceError(f"{where}: line {i}, column {c!r} = {cell!r}: expected a finite number")
            out[c][i - 2] = v
    return out


def _positive(where: str, name: str, values: np.ndarray, allow_zero: bool = False) -> None:
    vals = values[np.isfinite(values)]
    bad = vals < 0 if allow_zero else vals <= 0
    if bad.any():
        raise TraceError(f"{where}: column {name!r} has {float(vals[bad][0])!r}; expected numbers "
                         + (">= 0" if allow_zero else "> 0"))


def _ids(where: str, name: str, values: np.ndarray, count: int, what: str) -> np.ndarray:
    if (values != np.round(values)).any() or (values < 0).any() or (values >= count).any():
        bad = values[(values != np.round(values)) | (values < 0) | (values >= count)][0]
        raise TraceError(f"{where}: column {name!r} has {bad:g}; expected {what} ids 0..{count - 1}")
    return values.astype(np.int64)


@dataclass(frozen=True)
class DeviceTrace:
    """Per trace row: seconds per SGD step and, optionally, the device's uplink and downlink rates on link 1
    (bits/s; NaN: the configured rate).  Device ``d`` takes row ``d mod rows``."""

    step_seconds: np.ndarray
    up_rate: np.ndarray
    down_rate: np.ndarray

    @classmethod
    def read(cls, path: str, key: str) -> DeviceTrace:
        t = read_table(path, key, ("device", "step_seconds"), ("up_rate", "down_rate"))
        where = f"config key '{key}' = {path!r}"
        order = np.argsort(t["device"], kind="stable")
        if len(np.unique(t["device"])) != len(t["device"]):
            raise TraceError(f"{where}: a device appears on several rows; give one row per device")
        if not np.array_equal(t["device"][order], np.arange(len(order))):
            raise TraceError(f"{where}: the device column holds {len(order)} rows, so it must list the ids "
                             f"0..{len(order) - 1} (any order); device d of the tree takes row d mod {len(order)}")
        _positive(where, "step_seconds", t["step_seconds"])
        nan = np.full(len(order), math.nan)
        for c in ("up_rate", "down_rate"):
            _positive(where, c, t.get(c, nan))
        return cls(t["step_seconds"][order], t.get("up_rate", nan)[order], t.get("down_rate", nan)[order])

    def rows(self, count: int) -> np.ndarray:
        """The trace row of each of ``count`` devices."""
        return np.arange(count) % len(self.step_seconds)


@dataclass(frozen=True)
class LinkTrace:
    """Rows ``(link, child, up_rate, up_latency, down_rate, down_latency)``; NaN keeps the configured value."""

    link: np.ndarray
    child: np.ndarray
    values: dict[str, np.ndarray]

    COLUMNS = ("up_rate", "up_latency", "down_rate", "down_latency")

    @classmethod
    def read(cls, path: str, key: str, children: Sequence[int]) -> LinkTrace:
        """``children[n-1]``: the number of children of link ``n`` (nodes at layer ``n-1``)."""
        t = read_table(path, key, ("link", "child"), cls.COLUMNS)
        where = f"config key '{key}' = {path!r}"
        raw = t["link"]
        wrong = (raw != np.round(raw)) | (raw < 1) | (raw > len(children))
        if wrong.any():
            raise TraceError(f"{where}: column 'link' has {raw[wrong][0]:g}; expected links 1..{len(children)} "
                             "(1: devices -> layer 1, the last: -> the cloud)")
        link = raw.astype(np.int64)
        child = np.empty(len(link), dtype=np.int64)
        for i, n in enumerate(link):
            child[i] = _ids(where, "child", t["child"][i : i + 1], children[n - 1], f"layer-{n - 1} node")[0]
        pairs = set()
        for i, pair in enumerate(zip(link.tolist(), child.tolist())):
            if pair in pairs:
                raise TraceError(f"{where}: line {i + 2}: link {pair[0]}, child {pair[1]} appears on an earlier "
                                 "row too; give one row per (link, child)")
            pairs.add(pair)
        for c in cls.COLUMNS:
            if c in t:
                _positive(where, c, t[c], allow_zero=c.endswith("latency"))
        return cls(link, child, {c: t[c] for c in cls.COLUMNS if c in t})


@dataclass(frozen=True)
class Availability:
    """When each device is online: per listed device, sorted ``[online, offline)`` intervals in virtual seconds
    (a device without rows is always online; an empty interval lists one that never is); with ``period > 0``
    the pattern repeats every ``period`` s."""

    intervals: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    period: float = 0.0

    @classmethod
    def read(cls, path: str, key: str, devices: int, period: float) -> Availability:
        t = read_table(path, key, ("device", "online", "offline"))
        where = f"config key '{key}' = {path!r}"
        dev = _ids(where, "device", t["device"], devices, "device")
        on, off = t["online"], t["offline"]
        if (on < 0).any() or (off < on).any():
            i = int(np.flatnonzero((on < 0) | (off < on))[0])
            raise TraceError(f"{where}: line {i + 2}: online {on[i]:g}, offline {off[i]:g}; expected "
                             "0 <= online <= offline (seconds of virtual time; online = offline lists a device "
                             "that is never online)")
        if period > 0 and (off > period).any():
            i = int(np.flatnonzero(off > period)[0])
            raise TraceError(f"{where}: line {i + 2}: offline {off[i]:g} is after the end of the period "
                             f"system.availability_period = {period:g}; shorten the interval or lengthen the period")
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        order = np.lexsort((on, dev))
        for d in np.unique(dev):
            rows = order[dev[order] == d]
            s, e = on[rows], off[rows]
            if (s[1:] < e[:-1]).any():
                raise TraceError(f"{where}: device {int(d)} has overlapping intervals; merge them")
            out[int(d)] = (s, e)
        return cls(out, period)

    def online(self, devices: np.ndarray, t: float) -> np.ndarray:
        """Whether each of ``devices`` is online at virtual time ``t``."""
        if self.period > 0:
            t = math.fmod(t, self.period)
        out = np.ones(len(devices), dtype=bool)
        for j, d in enumerate(np.asarray(devices).tolist()):
            iv = self.intervals.get(d)
            if iv is not None:
                k = int(np.searchsorted(iv[0], t, side="right")) - 1
                out[j] = k >= 0 and t < iv[1][k]
        return out


@dataclass(frozen=True)
class SystemSpec:
    """The ``system:`` section, typed (docs/system.md); every per-link tuple has N entries, cloud last."""

    speed: Distribution = Distribution()
    jitter: Distribution = Distribution()
    link_spread: tuple[Distribution, ...] = ()
    down_rate: tuple[float, ...] = ()      # 0: the downlink takes no time
    down_latency: tuple[float, ...] = ()
    shared: tuple[bool, ...] = ()          # the parent's ingress shared by the messages in flight
    ingress_rate: tuple[float, ...] = ()   # 0: the link's uplink rate
    device_trace: DeviceTrace | None = None
    link_trace: LinkTrace | None = None
    availability: Availability | None = None
