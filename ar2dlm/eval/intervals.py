"""Confidence intervals of accuracies: the 95% Wilson score interval of a proportion.

With a few hundred prompts one prompt is a fraction of a point, so every accuracy in a report comes with
its interval and the prompt count. The Wilson interval (Wilson 1927; Newcombe 1998, method 3) inverts the
score test: the proportions p with |k/n - p| <= z * sqrt(p (1 - p) / n). Unlike the normal approximation it
stays inside [0, 1] and is not empty at 0/n or n/n.
"""

from __future__ import annotations

import math

Z_95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of ``successes`` out of ``n``; (0.0, 1.0) when n == 0
    (no evidence: every proportion is possible). ValueError unless 0 <= successes <= n and z > 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes} n={n}")
    if z <= 0:
        raise ValueError(f"z={z} must be > 0")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    scale = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the ends, not 1e-17 off
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def successes_of(accuracy: float, n: int) -> int:
    """The success count behind an accuracy measured on ``n`` items (rounded: accuracies are k / n)."""
    return round(accuracy * n)

