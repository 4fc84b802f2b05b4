"""Input cases shared by the codec kernel tests (tests/test_codec_kernels.py) and the device codecs' tests
(tests/test_accel.py): every level width, message lengths from empty to over 10^5, and child/parent pairs."""
from __future__ import annotations

import numpy as np

LEVELS = sorted({s for b in range(1, 16) for s in (2 ** (b - 1), 2**b - 1)})
LENGTHS = [0, 1, 5, 1000, 100003]


def pair(d: int, seed: int, kind: str = "normal") -> tuple[np.ndarray, np.ndarray]:
    """A float32 (child, parent) pair of length ``d``: normal values, some non-finite ones (``nonfinite``), or a
    child equal to its parent (``zeros``: the difference is zero)."""
    g = np.random.default_rng(seed)
    child = g.standard_normal(d).astype(np.float32)
    parent = g.standard_normal(d).astype(np.float32)
    if kind == "nonfinite" and d:
        for k, v in zip(g.choice(d, min(d, 7), replace=False), [np.inf, -np.inf, np.nan, np.inf, np.nan, -np.inf, 1e38]):
            child[k] = v
    if kind == "zeros":
        child = parent.copy()
    return child, parent
