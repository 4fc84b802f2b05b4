"""Golden-section search of a one-dimensional function (pure): the fitted scale of the calibration and bound v2's
multipliers use it."""
from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["golden_section"]

_G = (math.sqrt(5.0) - 1.0) / 2.0


def golden_section(f: Callable[[float], float], a: float, b: float, tol: float) -> tuple[float, float]:
    """The bracket ``(a, b)``, narrowed to at most ``tol`` around a minimum of ``f`` (unimodal on it)."""
    x1, x2 = b - _G * (b - a), a + _G * (b - a)
    f1, f2 = f(x1), f(x2)
    while b - a > tol:
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - _G * (b - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + _G * (b - a)
            f2 = f(x2)
    return a, b
