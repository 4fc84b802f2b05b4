"""Learning-rate schedules over global rounds (pure: no torch, mpi4py or h5py).

A schedule maps the global round ``t`` of a local run to its learning rate, in
Python (float64) arithmetic; the trainer hands that float to torch, which
rounds it to float32 inside the update kernel, exactly as a fixed ``lr`` is.
Every rank evaluates the same expression on the same ``t``, so every rank uses
the same learning rate.

  constant  lr
  step      lr * gamma ** (t // step_rounds)
  cosine    lr_min + 0.5 * (lr - lr_min) * (1 + cos(pi * t / rounds)),  t in [0, rounds)
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine")


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} = {value!r}: must be a finite number")
    return float(value)


def _integer(name: str, value: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} = {value!r}: must be an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} = {value!r}: must be an integer") from None


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """The learning rate of global round ``t``: :meth:`at`.

    Keyword-only fields (``kind`` has a default, ``lr`` has none):
    ``kind`` one of :data:`SCHEDULES`; ``lr`` > 0 the initial (``constant``: only) rate;
    ``step_rounds`` >= 1 rounds per decay and ``gamma`` in (0, 1] the decay factor (``step``);
    ``lr_min`` in [0, lr] the final rate and ``rounds`` >= 1 the length of the run (``cosine``,
    normally ``train.rounds``).  Fields a kind does not use are still checked for type and
    finiteness, not for range.
    """

    kind: str = "constant"
    lr: float
    step_rounds: int = 0
    gamma: float = 0.1
    lr_min: float = 0.0
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"kind = {self.kind!r}: must be one of {', '.join(SCHEDULES)}")
        lr = _finite("lr", self.lr)
        if not lr > 0:
            raise ValueError(f"lr = {self.lr!r}: must be > 0")
        gamma = _finite("gamma", self.gamma)
        lr_min = _finite("lr_min", self.lr_min)
        step_rounds, rounds = _integer("step_rounds", self.step_rounds), _integer("rounds", self.rounds)
        if self.kind == "step":
            if step_rounds < 1:
                raise ValueError(f"step_rounds = {self.step_rounds!r}: must be >= 1 for the step schedule")
            if not 0 < gamma <= 1:
                raise ValueError(f"gamma = {self.gamma!r}: must be in (0, 1]")
        if self.kind == "cosine":
            if rounds < 1:
                raise ValueError(f"rounds = {self.rounds!r}: must be >= 1 for the cosine schedule")
            if not 0 <= lr_min <= lr:
                raise ValueError(f"lr_min = {self.lr_min!r}: must be in [0, lr] = [0, {self.lr!r}]")

    def at(self, round_: int) -> float:
        """The learning rate of global round ``round_`` (>= 0; < ``rounds`` for ``cosine``)."""
        t = _integer("round", round_)
        if t < 0:
            raise ValueError(f"round = {round_!r}: must be >= 0")
        lr = float(self.lr)
        if self.kind == "constant":
            return lr
        if self.kind == "step":
            return lr * float(self.gamma) ** (t // operator.index(self.step_rounds))
        rounds = operator.index(self.rounds)
        if t >= rounds:
            raise ValueError(f"round = {round_!r}: the cosine schedule covers rounds [0, {rounds})")
        lr_min = float(self.lr_min)
        return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / rounds))
