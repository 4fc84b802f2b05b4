"""What a global round measures, typed: one rank's :class:`RoundStats`, and the :class:`RoundTotals` every rank
agrees on after :meth:`RoundStats.reduce`.  Pure: the reduction over ranks is given as two functions.

Losses and steps are kept per device that trains in the round (each entry
filled by the one rank that hosts the device; the round's devices, sorted, are
the plan's :meth:`~qmlhfl_mpi.core.plan.RoundPlan.devices`), so that summing
them over ranks and then over devices in device order gives the same float for
any number of ranks, and the cost follows the drawn devices, not the population.  Bytes and
messages are counted per link where they are sent; times are the slowest
rank's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["RoundStats", "RoundTotals"]

Reduce = Callable[[np.ndarray], np.ndarray]


@dataclass
class RoundStats:
    """What one rank did in one global round (see the module doc)."""

    devices: np.ndarray                             # int64, ascending: the devices that train in the round
    num_links: int
    loss: np.ndarray = field(init=False)            # per device of ``devices``: sum of its step losses
    steps: np.ndarray = field(init=False)           # per device of ``devices``: SGD steps
    uplink_bytes: np.ndarray = field(init=False)    # per link: bytes of the messages this rank sent up
    messages: np.ndarray = field(init=False)        # per link: messages this rank sent up
    downlink_bytes: np.ndarray = field(init=False)  # per link: bytes of the models its nodes sent down
    secagg_bytes: np.ndarray = field(init=False)    # per link: secure aggregation's keys and recovery (both ways)
    t_compute: float = 0.0
    t_codec: float = 0.0
    t_comm: float = 0.0

    def __post_init__(self) -> None:
        self.devices = np.asarray(self.devices, dtype=np.int64)
        self.loss = np.zeros(self.devices.size)
        self.steps = np.zeros(self.devices.size)
        self.uplink_bytes = np.zeros(self.num_links, dtype=np.int64)
        self.messages = np.zeros(self.num_links, dtype=np.int64)
        self.downlink_bytes = np.zeros(self.num_links, dtype=np.int64)
        self.secagg_bytes = np.zeros(self.num_links, dtype=np.int64)

    def add(self, device: int, loss_sum: float, steps: int) -> None:
        """One local run of ``device`` (one of :attr:`devices`): its sum of step losses and its steps."""
        i = int(np.searchsorted(self.devices, device))
        if i >= self.devices.size or self.devices[i] != device:
            raise ValueError(f"device {device} does not train in this round (devices {self.devices[:8].tolist()}...)")
        self.loss[i] += loss_sum
        self.steps[i] += steps

    _SUMMED = ("loss", "steps", "uplink_bytes", "messages", "downlink_bytes", "secagg_bytes")
    _PEAKS = ("t_compute", "t_codec", "t_comm")

    def reduce(self, total: Reduce, peak: Reduce, t_round: float) -> RoundTotals:
        """The round's totals over all ranks: ``total`` sums a float64 vector over ranks elementwise, ``peak``
        takes its maximum (each called once: collective where they are)."""
        parts = [np.asarray(getattr(self, k), dtype=np.float64) for k in self._SUMMED]
        summed = total(np.concatenate(parts))
        out: dict[str, np.ndarray] = {}
        off = 0
        for k, p in zip(self._SUMMED, parts):
            out[k] = summed[off : off + p.size]
            off += p.size
        peaks = peak(np.array([*(getattr(self, k) for k in self._PEAKS), t_round], dtype=np.float64))
        return RoundTotals(
            train_loss=float(out["loss"].sum() / max(out["steps"].sum(), 1)),
            uplink_bytes=out["uplink_bytes"].astype(np.int64), messages=out["messages"].astype(np.int64),
            downlink_bytes=out["downlink_bytes"].astype(np.int64),
            secagg_bytes=out["secagg_bytes"].astype(np.int64), time_compute=float(peaks[0]),
            time_codec=float(peaks[1]), time_comm=float(peaks[2]), time_round=float(peaks[3]))


@dataclass(frozen=True)
class RoundTotals:
    """A round's measurements, the same on every rank: the mean step loss of the devices that trained, the
    bytes and messages per link, and the slowest rank's seconds."""

    train_loss: float
    uplink_bytes: np.ndarray
    messages: np.ndarray
    downlink_bytes: np.ndarray
    secagg_bytes: np.ndarray
    time_compute: float
    time_codec: float
    time_comm: float
    time_round: float

    def as_record(self) -> dict[str, object]:
        """The fields by name, for the round's record."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
