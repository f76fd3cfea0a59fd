"""Memory budgets: fractions of the full model's measured training memory (DESIGN.md, "Memory budgets").

``--memory-budget`` items are fractions, absolute sizes ('8MB') or ``devices``; ``fractions`` turns them into
fractions once the full model's memory is measured, so methods and the engine see fractions only. Which
client gets which fraction (``client_budgets``, ``draw_budgets``: the engine's), and how a method fits a
configuration to one (``fit_largest``, ``too_small``: the budgeted methods').
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from fedbench.errors import ConfigError
from fedbench.seeding import derive

T = TypeVar("T")
DEVICES = "devices"  # --memory-budget devices: each client's budget is its device's memory


def label(item: float | str) -> str:
    """How a budget item is shown: 0.25, 8MB, devices."""
    return item if isinstance(item, str) else f"{item:g}"


def fractions(items: Sequence[float | str], full: int, memory: Sequence[float] = ()) -> list[float]:
    """The budget items as fractions of ``full`` bytes; ``devices``: one per client, its device's ``memory``."""
    from fedbench.devices import size

    if tuple(items) == (DEVICES,):
        return [m / full for m in memory]
    return [size(i) / full if isinstance(i, str) else float(i) for i in items]


def client_budgets(fractions: Sequence[float], clients: int) -> list[float]:
    """Equal groups by client index: client c gets fractions[c * len(fractions) // clients]."""
    return [fractions[c * len(fractions) // clients] for c in range(clients)]


def draw_budgets(fractions: Sequence[float], clients: int, seed: int, rnd: int) -> list[float]:
    """FedRolex's "dynamic" capacities: each client's budget drawn uniformly from the list every round."""
    return [fractions[derive(seed, "budget", rnd, c) % len(fractions)] for c in range(clients)]


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


class Infeasible(ConfigError):
    """A budget below the method's measured floor on this model: ``floor`` is the smallest budget it can meet
    (a fraction of the full model's training memory); ``fedbench compare`` shows such a cell as infeasible."""

    def __init__(self, message: str, floor: float):
        super().__init__("--memory-budget", message)
        self.floor = floor


def too_small(fraction: float, smallest: int, full: int, what: str) -> Infeasible:
    floor = smallest / full
    return Infeasible(f"{fraction:g} ({fraction * full / 1e6:.3g} MB) is below the smallest configuration {what}, "
                      f"which measures {floor:.3f} of the full model's training memory ({smallest / 1e6:.3g} MB); "
                      f"allowed: budgets >= {floor:.3f}", floor)


def budget_order(labels) -> list[str]:
    """Budget labels ('0.25', '8MB', or '0.125+0.5' for a mixed-budget run) in numeric order: fractions, then
    sizes, then devices; mixed ones last."""
    from fedbench.devices import size

    def key(item: str) -> tuple:
        return (item == DEVICES, size(item) is not None, size(item) or (0 if item == DEVICES else float(item)))
    return sorted(set(labels), key=lambda b: ("+" in b, [key(v) for v in b.split("+")]))
