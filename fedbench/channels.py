"""Channel index policies: which global channels of each group a width-w client holds.

Every policy keeps ``scaled(C, w, rounding)`` channels of a group of C channels and returns
sorted global indices. Groups joined by identity shortcuts (``FedModel.tied_groups()``) get
one shared index set, so residual additions line up (methods-width-slt.md §6 item 2).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fedbench.models.base import scaled


def first_k(full: Mapping[str, int], width: float, rounding: str = "ceil") -> dict[str, range]:
    """The first ceil/floor(w * C) channels of every group (HeteroFL §2.1; nested sub-models)."""
    return {g: range(scaled(c, width, rounding)) for g, c in full.items()}


def _tied(full: Mapping[str, int], ties: Sequence[Sequence[str]], width: float, rounding: str,
          choose: Callable[[int, int], list[int]]) -> dict[str, list[int]]:
    """``choose(C, k)`` once per independent group (in ``full``'s order); tied groups share their leader's set."""
    leader = {g: tie[0] for tie in ties for g in tie}
    for tie in ties:
        if len({full[g] for g in tie}) > 1:
            raise ValueError(f"tied groups {tie} have different widths")
    out: dict[str, list[int]] = {}
    for g in full:
        lead = leader.get(g, g)
        if lead not in out:
            out[lead] = sorted(choose(full[lead], scaled(full[lead], width, rounding)))
        out[g] = out[lead]
    return out


def rolling(full: Mapping[str, int], width: float, rnd: int, ties: Sequence[Sequence[str]] = (),
            rounding: str = "floor") -> dict[str, list[int]]:
    """FedRolex's window (Alam et al. 2022, Eq. 4): k consecutive cyclic indices from ``rnd mod C``.

    Shared by every client of a round (a narrower client holds a prefix of the same window);
    the window advances one channel per round, so every channel is covered over C rounds.
    """
    return _tied(full, ties, width, rounding, lambda c, k: [(rnd + i) % c for i in range(k)])


def random(full: Mapping[str, int], width: float, gen: torch.Generator, ties: Sequence[Sequence[str]] = (),
           rounding: str = "floor") -> dict[str, list[int]]:
    """Federated Dropout's subset (Caldas et al. 2018; SLT's FD, methods-width-slt.md §3.2):
    a uniform random k-subset per group, drawn from ``gen`` (per client, round and layer)."""
    return _tied(full, ties, width, rounding,
                 lambda c, k: torch.randperm(c, generator=gen, device=gen.device)[:k].tolist())
