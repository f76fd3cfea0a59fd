"""Channel index policies: which global channels of each group a width-w client holds."""
from __future__ import annotations

from collections.abc import Mapping

from fedbench.models.base import scaled


def first_k(full: Mapping[str, int], width: float, rounding: str = "ceil") -> dict[str, range]:
    """The first ceil/floor(w * C) channels of every group (HeteroFL §2.1; nested sub-models)."""
    return {g: range(scaled(c, width, rounding)) for g, c in full.items()}
