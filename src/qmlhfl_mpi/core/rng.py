"""Random streams keyed by (run seed, purpose, entity, round, ...).

There is no global random state anywhere in qmlhfl_mpi: every random choice
draws from a generator built here from the run seed and the identity of what
it is for, so results do not depend on which rank computes them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# purposes (never renumber: they are part of the results' reproducibility)
DATA = 1       # synthetic data of a device: (seed, DATA, device)
INIT = 2       # initial cloud model: (seed, INIT)
BATCH = 3      # minibatches: (seed, BATCH, device, round, call)
QUANT = 4      # quantizer: (seed, QUANT, layer, node, round, call)
PARTITION = 5  # data partition: (seed, PARTITION, ...)
SIZES = 6      # synthetic per-device sizes: (seed, SIZES, device)
FORWARD = 7    # randomness inside a model's forward (dropout): (seed, FORWARD, device, round, call)
SAMPLE = 8     # children drawn for an aggregation: (seed, SAMPLE, layer, node, round, call)
AVAIL = 9      # children up in an aggregation: (seed, AVAIL, layer, node, round, call)
DOWN = 10      # downlink quantizer: (seed, DOWN, layer, node, round, call)
SYSTEM = 11    # the system model: (seed, SYSTEM, SPEED), (seed, SYSTEM, JITTER, round) per device,
               # (seed, SYSTEM, LINK, n) per child of link n, (seed, SYSTEM, TRACE, ...) generated traces
SPEED, JITTER, LINK, TRACE = 0, 1, 2, 3  # the system model's sub-purposes (core/system.py)
MOBILITY = 12  # devices moving between edge servers: (seed, MOBILITY, round), counters 2d and 2d + 1
NOISE = 13     # differential privacy's Gaussian noise: (seed, NOISE, layer, node, round, call); a device's
               # (local placement): (seed, NOISE, 0, device, round, training call)
ROTATE = 14    # intsum's random signs, shared by a group: (seed, ROTATE, layer, node, round, call)
SECAGG = 15    # a secure aggregation's private keys: (seed, SECAGG, layer, node, round, call, child)
CLIPCOUNT = 16  # adaptive clipping's noise on the count of unclipped updates: keyed like NOISE
DRAWS = 17     # an optimiser's evaluation: the random candidate draws, (seed, DRAWS)
VALIDATION = 18  # the validation part of a pooled training set: (data seed, VALIDATION)


def stream(seed: int, purpose: int, *ids: int) -> np.random.Generator:
    """A fresh PCG64 generator for ``(seed, purpose, *ids)``; all ids are >= 0."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, purpose, *ids])))


def generator(key: Sequence[int]) -> np.random.Generator:
    """:func:`stream` for a whole key ``(seed, purpose, *ids)``."""
    return stream(*key)
