"""A client's plan: which part of the global model it trains this round, and how (DESIGN.md)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Step:
    """One sequential training step of a round (FEDEPTH has several; most methods one).

    blocks: indices of the blocks that run, in order (None: all). trainable: parameter-name
    prefixes that are trained (None: every parameter of the sub-model); the rest are frozen.
    name: a label the method may use to pick a head or loss (e.g. an auxiliary head).
    """

    blocks: tuple[int, ...] | None = None
    trainable: tuple[str, ...] | None = None
    name: str = ""

    def trains(self, param_name: str) -> bool:
        return self.trainable is None or any(
            param_name == p or param_name.startswith(p + ".") for p in self.trainable)


@dataclass(frozen=True)
class Plan:
    """The sub-model a client receives.

    indices: per channel group, the sorted global indices the client holds (missing: all).
    steps: the training steps run in order. rate: HeteroFL's Scaler rate (1 = none).
    label: how the configuration is shown in clients.csv. index_bytes: index overhead sent
    down with the plan (e.g. Federated Dropout's channel lists). options: method-specific,
    hashable extras (part of the plan's shape).
    """

    indices: tuple[tuple[str, tuple[int, ...]], ...] = ()
    steps: tuple[Step, ...] = (Step(),)
    rate: float = 1.0
    label: str = "full"
    index_bytes: int = 0
    options: tuple[tuple[str, object], ...] = field(default=())

    @classmethod
    def of(cls, indices: Mapping[str, Sequence[int]] | None = None, **kw) -> "Plan":
        return cls(indices=tuple(sorted((g, tuple(int(i) for i in ix)) for g, ix in (indices or {}).items())), **kw)

    @property
    def index_map(self) -> dict[str, tuple[int, ...]]:
        return dict(self.indices)

    def widths(self, full: Mapping[str, int]) -> dict[str, int]:
        held = self.index_map
        return {g: len(held[g]) if g in held else c for g, c in full.items()}

    def blocks(self) -> tuple[int, ...] | None:
        """Blocks that run in any step (None: all)."""
        if any(s.blocks is None for s in self.steps):
            return None
        return tuple(sorted({b for s in self.steps for b in s.blocks}))

    def option(self, key: str, default: object = None) -> object:
        return dict(self.options).get(key, default)

    def shape_key(self) -> tuple:
        """What determines memory and FLOPs: widths, steps, rate and options, not which indices."""
        return (tuple((g, len(ix)) for g, ix in self.indices), self.steps, self.rate, self.options)


EXCLUDED = Plan(steps=(), label="excluded")  # a client that sits the round out: trains, receives and sends nothing
OFFLINE = Plan(steps=(), label="offline")    # its device is not available this round (--devices availability)


def out_of_memory(plan: Plan) -> Plan:
    """``plan``'s client under ``--over-budget drop``: it sits the round out like ``EXCLUDED``, labelled with the
    configuration that did not fit."""
    return Plan(steps=(), label=f"out of memory ({plan.label})", options=(("out_of_memory", True),))
