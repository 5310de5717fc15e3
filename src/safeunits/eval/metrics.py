"""Rates with Wilson 95% confidence intervals: eval sets are small, so every rate carries its interval."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well-behaved at 0 and n, unlike the normal one)."""
    if n <= 0:
        raise ValueError("a rate needs n > 0")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, {n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds at 0 and n (no 1e-17 residue)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi
