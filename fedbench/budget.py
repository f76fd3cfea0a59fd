"""Memory budgets: fractions of the full model's measured training memory, turned into configurations."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from fedbench.errors import ConfigError

T = TypeVar("T")

WIDTHS = tuple(k / 64 for k in range(1, 65))  # the width grid searched by width-based methods


def fit_largest(candidates: Sequence[T], memory: Callable[[T], int], budget: float) -> T | None:
    """The largest candidate whose measured memory fits ``budget`` bytes.

    Candidates are ordered so that memory does not decrease; a binary search measures
    O(log n) of them (each measurement is cached by the profiler).
    """
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if memory(candidates[mid]) <= budget:
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def too_small(fraction: float, smallest: int, full: int, what: str) -> ConfigError:
    return ConfigError("--memory-budget", f"{fraction:g} is below the smallest configuration {what}, which "
                       f"measures {smallest / full:.3f} of the full model's training memory; "
                       f"allowed: budgets >= {smallest / full:.3f}")
