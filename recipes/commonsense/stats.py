"""How much an accuracy on n items can be trusted: a 95% interval for one accuracy, and whether a before/after
change on the same items is more than noise.

wilson     Wilson score interval of k correct out of n (Newcombe 1998; sane at 0 and n, unlike the normal one).
mean_interval  the same for an unweighted mean of per-task accuracies, with the effective item count
           n_eff = T² / Σ 1/n_t (= the pooled n when every task has the same n).
mcnemar_p  exact two-sided McNemar test: of the items whose outcome changed, b improved and c got worse; with no
           real change b ~ Binomial(b + c, 1/2). p >= 0.05: the change is within noise.
"""
from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return float("nan"), float("nan")
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(accuracies: Sequence[float], ns: Sequence[int]) -> tuple[float, float]:
    if not ns or min(ns) <= 0:
        return float("nan"), float("nan")
    n_eff = len(ns) ** 2 / sum(1.0 / n for n in ns)
    mean = sum(accuracies) / len(accuracies)
    return wilson(mean * n_eff, n_eff)


def mcnemar_p(improved: int, worsened: int) -> float:
    m = improved + worsened
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(improved, worsened) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def changed(before: Sequence[bool], after: Sequence[bool]) -> tuple[int, int]:
    """(improved, worsened): items right only after, right only before (same items, same order)."""
    if len(before) != len(after):
        raise ValueError(f"before and after must score the same items, got {len(before)} and {len(after)}")
    return (sum(a and not b for b, a in zip(before, after)), sum(b and not a for b, a in zip(before, after)))
