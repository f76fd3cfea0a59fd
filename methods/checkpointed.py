"""FedAvg with activation checkpointing (a memory baseline: Chen et al. 2016, arXiv 1604.06174).

Every client trains the full model with FedAvg's SGD; a client whose budget is below the full
model's memory runs the model's ``blocks`` as n consecutive *segments*, each under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: a segment keeps only its input
for backward and recomputes its forward when the backward reaches it. n segments = the blocks
split into n near-equal consecutive groups (sizes differ by at most one; the larger groups are
the later ones, whose activations are the smaller in a CNN). The stem runs inside the first
segment (its activations are at full resolution, as large as a first-stage block's; measured on
ResNet-20 / fmnist-mini this lowers the floor from 0.509 to 0.432 of the full model's memory at
batch 32, from 0.557 to 0.485 at batch 16); the head runs normally.

n is the *fewest* segments whose measured peak fits b x the full model's memory, found in
``setup`` by measuring n = 1, 2, ..., len(blocks) in turn (a scan, not a binary search: the peak
need not be monotone in n, as the largest segment's recompute and the number of saved segment
inputs trade off); b >= 1 means no checkpointing (FedAvg). The floor is one segment's recompute
plus backward at block granularity (ResNet-20, batch 32: 0.432), so lower budgets are refused as
infeasible. The gradients are FedAvg's, bit for bit (the recompute is deterministic: fedbench's
BatchNorms use batch statistics, with no running statistics that a recompute would update twice;
dropout draws are replayed by checkpoint's RNG-state preservation).

Cost: the stem's and every block's forward run twice. The profiler's FLOP count
(``FlopCounterMode`` on meta) sees the recomputation (it runs inside the backward, under the
counting mode): training FLOPs per sample rise by the stem's and blocks' forward FLOPs (ResNet-20:
+33%, 0.186 -> 0.248 GFLOPs per sample at any n). A recompute stops at the last tensor the backward
needs (checkpoint's early stop), so trailing ops whose output is not saved run once and the count
can depend on n: ViT-tiny (4 blocks) counts 0.731 -> 0.937 at n = 2 and 0.899 at n = 4, each
segment's last MLP output projection not being recomputed.

Evaluation: the full global model. Clients train one at a time (``trains_batched = False``):
``torch.func`` transforms refuse checkpoint's saved-tensor hooks ("torch.func.{grad, vjp, ...}
don't yet support saved tensor hooks", torch 2.14).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedbench.budget import too_small
from fedbench.errors import ConfigError
from fedbench.method import Method, register_method
from fedbench.models import FedModel
from fedbench.plan import Plan, Step

SEGMENTS = "segments"


def segments(blocks: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    """``blocks`` in ``n`` consecutive groups whose sizes differ by at most one (the larger ones last)."""
    size, extra = divmod(len(blocks), n)
    sizes = [size + (i >= n - extra) for i in range(n)]
    out, start = [], 0
    for s in sizes:
        out.append(tuple(blocks[start:start + s]))
        start += s
    return out


def run_blocks(model: FedModel, x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    for i in blocks:
        x = model.blocks[i](x)
    return x


@register_method
class FedAvgCheckpointed(Method):
    name = "fedavg-ckpt"
    description = ("FedAvg of the full model with activation checkpointing over the fewest block segments "
                   "whose measured peak fits the budget (blocks' forward recomputed in backward)")
    paper = ("Chen et al. 2016, Training Deep Nets with Sublinear Memory Cost (arXiv 1604.06174); "
             "FedAvg: McMahan et al. 2017 (arXiv 1602.05629)")
    budgeted = True
    trains_batched = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.depth = len(ctx.model.blocks)
        self.segments: dict[float, int] = {}
        tracked = [n for n, m in ctx.model.blocks.named_modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if tracked:
            raise ConfigError("--model", f"{ctx.config.model} has BatchNorm with running statistics "
                                         f"(blocks.{tracked[0]}), which a checkpoint's recompute would update "
                                         "twice; allowed: models whose norms use batch statistics (every fedbench model)")

    def segment_plan(self, n: int) -> Plan:
        if n == 0:
            return self.full_plan()
        return Plan(label=f"ckpt x{n}", options=((SEGMENTS, n),))

    def fit_segments(self, budget: float) -> int:
        if budget >= 1:
            return 0
        memory, cap = self.ctx.profiler.memory_of, budget * self.ctx.full_memory
        for n in range(1, self.depth + 1):
            if memory(self.segment_plan(n)) <= cap:
                return n
        smallest = min(range(1, self.depth + 1), key=lambda n: memory(self.segment_plan(n)))
        raise too_small(budget, memory(self.segment_plan(smallest)), self.ctx.full_memory,
                        f"(checkpointing in {smallest} segments)")

    def setup(self) -> None:
        self.segments = {b: self.fit_segments(b) for b in self.budgets}

    def plan(self, rnd, client, budget, gen) -> Plan:
        return self.segment_plan(self.segments[budget])

    def schedule(self):
        rows = []
        for b, n in self.segments.items():
            if n == 0:
                note = "no checkpointing"
            else:
                groups = segments(tuple(range(self.depth)), n)
                spans = [f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}" for g in groups]
                note = "segments " + " ".join(f"[{s}]" for s in [f"stem+{spans[0]}", *spans[1:]])
            rows.append(({"budget": b, "note": note}, self.segment_plan(n)))
        return rows

    def loss(self, model: FedModel, x: torch.Tensor, y: torch.Tensor, plan: Plan, step: Step) -> torch.Tensor:
        """Stem + the first segment, then each further segment, under checkpoint; then the head.
        Plain FedAvg without the option."""
        n = plan.option(SEGMENTS)
        if not n:
            return super().loss(model, x, y, plan, step)
        blocks = tuple(range(len(model.blocks))) if step.blocks is None else tuple(step.blocks)
        first, *rest = segments(blocks, min(n, len(blocks)))
        h = checkpoint(model.forward_features, x, first, use_reentrant=False)
        for group in rest:
            h = checkpoint(run_blocks, model, h, group, use_reentrant=False)
        return F.cross_entropy(model.forward_head(h), y)
