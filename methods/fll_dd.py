"""Federated layer-wise learning with depth dropout (Guo et al., PML4DC @ ICLR 2023, arXiv 2309.05213, §2.1-2.2;
methods-depth-ssl.md §3).

Training runs in phases, one per layer, shallow to deep: in phase p only layer p is active
(trained and uploaded), layers 1..p-1 are frozen and run forward only, and a SimCLR loss sits
on the active layer's output (through the shared projection head H). Depth dropout caps the
layers a client runs at its depth budget B: once p > B, the client keeps layer 1 (the paper's
reason: it follows the patch and position embeddings), a random subset of the frozen layers
2..p-1 in their original order, and the active layer, B layers in all. Dropped layers are skipped
by the residual stream and are neither downloaded nor run. Inference uses every layer.

B per client: ``--depth-budget`` for everyone, or else from the client's memory budget by
measurement: the largest B whose worst phase (phase 1, or a phase running B blocks) fits.
The paper's "dropout rate 50%" is ``--depth-budget`` = depth / 2.

Choices where the paper is silent (NOT FOUND in §3.3): the subset is re-drawn per client per
round (from the client's round generator); the projection head is LW-FedSSL's 3-layer H,
shared across phases; tau = 0.5 (SimCLR's CIFAR value); AdamW as in ``methods._ssl`` (the
paper states SGD at lr 1e-3, batch 16: ``--optimizer sgd --lr 1e-3 --batch-size 16``); the stem
trains with phase 1; several layers per phase via ``--blocks-per-stage`` (the paper mentions it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from fedbench.budget import fit_largest, too_small
from fedbench.errors import ConfigError
from fedbench.method import register_method
from fedbench.plan import Plan
from fedbench.settings import Range
from fedbench.methods.lw_fedssl import LayerWise, LayerWiseOptions


@dataclass(frozen=True)
class FLLOptions(LayerWiseOptions):
    tau: Annotated[float, Range(gt=0, le=100), "NT-Xent temperature (SimCLR)"] = 0.5
    depth_budget: Annotated[int, Range(ge=0, le=10_000), "B, layers run per training pass; 0: the largest that fits the memory budget"] = 0


@register_method
class FLLDepthDropout(LayerWise):
    name = "fll-dd"
    description = "layer-wise SimCLR, one active layer per phase; depth dropout keeps layer 1 + a random ordered subset"
    paper = "Guo et al. 2023, Towards Federated Learning Under Resource Constraints via Layer-wise Training and Depth Dropout (arXiv 2309.05213)"
    Options = FLLOptions
    objective = "simclr"
    budgeted = True

    def setup(self) -> None:
        """Resolve each budget fraction into B, the number of blocks a training pass may run."""
        depth, per = len(self.ctx.model.blocks), len(self.stages[0])
        smallest = min(depth, per + 1)  # layer 1 + the active layer(s)
        if self.options.depth_budget:
            if self.options.depth_budget < smallest:
                raise ConfigError("--depth-budget", f"{self.options.depth_budget} not allowed; allowed: "
                                                    f"{smallest}..{depth} (layer 1 and the active layers must run)")
            self.depth = {f: min(self.options.depth_budget, depth) for f in self.budgets}
            return
        full = self.ctx.full_memory
        self.depth = {}
        for f in self.budgets:
            best = fit_largest(range(smallest, depth + 1), self.depth_memory, f * full)
            if best is None:
                raise too_small(f, self.depth_memory(smallest), full, f"(depth budget {smallest})")
            self.depth[f] = best

    def depth_memory(self, b: int) -> int:
        """Measured peak of the worst phase at depth budget b: phase 1, or b blocks with the last active."""
        per = len(self.stages[0])
        kept = tuple(range(b))
        return max(self.ctx.profiler.memory_of(self.stage_plan(0)),
                   self.ctx.profiler.memory_of(self.layer_plan(kept, kept[-per:], stem=False, label=f"B={b}")))

    def plan(self, rnd: int, client: int, budget: float, gen: torch.Generator) -> Plan:
        s = self.stage_of(rnd)
        active, b = self.stages[s], self.depth[budget]
        frozen = range(active[0])
        if len(frozen) + len(active) <= b:
            kept = (*frozen, *active)
        else:  # layer 1 + an ordered random subset of layers 2..p-1 + the active layer(s)
            drawn = torch.randperm(len(frozen) - 1, generator=gen, device=gen.device)[:b - 1 - len(active)] + 1
            kept = (0, *sorted(drawn.tolist()), *active)
        return self.layer_plan(kept, active, stem=s == 0, label=f"phase {s + 1}/{len(self.stages)} B={b}")

    def schedule(self) -> list[tuple[dict, Plan]]:
        """Per budget: phase 1 and the last phase (B blocks run; a subset drawn with a fixed generator)."""
        gen = torch.Generator(device=self.ctx.device).manual_seed(self.config.seed)
        last = self.config.rounds - 1
        rows = []
        for f in self.budgets:
            b = self.depth[f]
            rows += [({"budget": f, "note": f"B={b}, phase 1"}, self.plan(0, 0, f, gen)),
                     ({"budget": f, "note": f"B={b}, last phase (worst)"}, self.plan(last, 0, f, gen))]
        return self.with_totals(rows)
