"""Adaptive clipping between rounds (docs/privacy.md, "Adaptive clipping"; Andrew et al., "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021): after every round the clip moves toward a quantile of the update
norms, from the round's noised count of updates within the clip.  Collective over the run's communicator."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..comm.collectives import sum_over_ranks
from ..comm.executor import RoundExecutor
from ..comm.watchdog import Watchdog
from ..core.plan import RoundPlan

__all__ = ["ClipState"]


class ClipState:
    """The clip of every round for ``executor`` (a fixed clip, an adaptive one, or none without privacy)."""

    def __init__(self, executor: RoundExecutor, comm: Any, guard: Watchdog | None = None) -> None:
        self.executor, self.comm, self.guard = executor, comm, guard

    def after_round(self, plan: RoundPlan) -> dict[str, float]:
        """The round's record, ``clip`` (the clip it used; NaN without privacy) and ``unclipped_fraction`` (the
        noised fraction of its updates within the clip; NaN with a fixed clip: it is not released), and, adaptive,
        the next round's clip on every rank.  Collective."""
        ex = self.executor
        mech = ex.privacy
        counts = ex.clip_counts.copy()
        ex.clip_counts[:] = 0
        if mech is None:
            return {"clip": math.nan, "unclipped_fraction": math.nan}
        used, fraction = ex.clip, math.nan
        if mech.quantile:
            total = sum_over_ranks(self.comm, counts.astype(np.float64), self.guard)  # integers, exact
            ex.clip, fraction = mech.next_clip(used, int(total[0]), int(total[1]), mech.count_noise(plan))
        return {"clip": used, "unclipped_fraction": fraction}

    def resume(self, metrics: dict[str, Any] | None, done: int) -> None:
        """After ``done`` rounds from a checkpoint: the clip of round ``done`` from rank 0's metrics (the clip and
        the noised fraction of round ``done - 1``), on every rank.  Collective."""
        mech = self.executor.privacy
        if mech is None or not mech.quantile or not done:
            return
        got = np.zeros(2)
        if metrics is not None and "clip" in metrics and len(metrics["clip"]) >= done:
            got[:] = float(metrics["clip"][done - 1]), float(metrics["unclipped_fraction"][done - 1])
        clip, fraction = sum_over_ranks(self.comm, got, self.guard)  # rank 0's values (the others add 0)
        if math.isfinite(fraction):
            clip *= math.exp(-mech.clip_lr * (fraction - mech.quantile))
        self.executor.clip = float(clip)
