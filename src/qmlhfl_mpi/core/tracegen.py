"""Synthetic traces in the formats of docs/system.md (pure: numpy and the csv module): a device-capacity trace
(seconds per SGD step, uplink and downlink rates, lognormal around medians) and a behaviour trace (each
device online and offline in turns, exponential durations: an alternating renewal process, as FedScale's
client behaviour traces are summarised).  Drawn from ``(seed, SYSTEM, TRACE, 0)`` and ``(seed, SYSTEM, TRACE,
1)`` in device order, so the same arguments give the same files.  ``qmlhfl-mpi traces`` writes them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import rng

__all__ = ["TraceShape", "availability_rows", "device_rows", "write_csv"]


@dataclass(frozen=True)
class TraceShape:
    """What the generated traces look like (medians, spreads, the behaviour's time scale)."""

    devices: int
    step_seconds: float = 0.01     # median seconds per SGD step
    speed_sigma: float = 0.5       # lognormal sigma of the step time
    up_rate: float = 1e7           # median uplink bits/s (downlink: 4x)
    rate_sigma: float = 0.5
    horizon: float = 3600.0        # seconds of behaviour written (the period to give system.availability_period)
    mean_online: float = 600.0     # mean seconds online, then offline, in turns
    mean_offline: float = 300.0
    always_online: float = 0.2     # share of devices with no row (always online)

    def __post_init__(self) -> None:
        for name in ("step_seconds", "up_rate", "horizon", "mean_online", "mean_offline"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected a number > 0")
        if self.devices < 1:
            raise ValueError(f"devices = {self.devices!r}: expected an integer >= 1")
        if self.speed_sigma < 0 or self.rate_sigma < 0 or not 0 <= self.always_online <= 1:
            raise ValueError("speed_sigma and rate_sigma must be >= 0 and always_online in [0, 1]")


def device_rows(shape: TraceShape, seed: int) -> dict[str, np.ndarray]:
    """Columns ``device, step_seconds, up_rate, down_rate`` of a device-capacity trace."""
    g = rng.stream(seed, rng.SYSTEM, rng.TRACE, 0)
    D = shape.devices
    speed = np.exp(shape.speed_sigma * g.standard_normal(D))
    rate = np.exp(shape.rate_sigma * g.standard_normal(D))
    return {"device": np.arange(D), "step_seconds": shape.step_seconds * speed, "up_rate": shape.up_rate * rate,
            "down_rate": 4 * shape.up_rate * rate}


def availability_rows(shape: TraceShape, seed: int) -> dict[str, np.ndarray]:
    """Columns ``device, online, offline`` of a behaviour trace over ``[0, horizon)``."""
    g = rng.stream(seed, rng.SYSTEM, rng.TRACE, 1)
    p_on = shape.mean_online / (shape.mean_online + shape.mean_offline)
    dev: list[int] = []
    on: list[float] = []
    off: list[float] = []
    for d in range(shape.devices):
        if g.random() < shape.always_online:
            continue
        t, up, listed = 0.0, bool(g.random() < p_on), False
        while t < shape.horizon:
            span = float(g.exponential(shape.mean_online if up else shape.mean_offline))
            end = min(t + span, shape.horizon)
            if up and end > t:
                dev.append(d)
                on.append(t)
                off.append(end)
                listed = True
            t, up = end, not up
        if not listed:  # offline throughout: listed with an empty interval (unlisted devices are always online)
            dev.append(d)
            on.append(0.0)
            off.append(0.0)
    return {"device": np.array(dev, dtype=np.int64), "online": np.array(on), "offline": np.array(off)}


def write_csv(path: str | Path, columns: dict[str, np.ndarray]) -> None:
    """The columns as a CSV file with a header row (integers as integers, floats with full precision)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(columns))
        for row in zip(*columns.values()):
            w.writerow([int(v) if isinstance(v, (np.integer, int)) else repr(float(v)) for v in row])
