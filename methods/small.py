"""The "small model" baseline of SLT (Pfeiffer et al., NeurIPS 2023, arXiv 2305.17005, §5).

FedAvg of the widest uniform-width model (first-k channels in every group) whose measured
training memory fits the *smallest* client budget; every client trains that model and it
is evaluated at that width (methods-width-slt.md §5.7, "Small model"). The width w is searched on
a 1/64 grid; a group of C channels keeps floor(w C) of them (at least one), as SLT's code builds
its small model (``nets/SubsetNets``: ``int(C * subset_factor)`` channels per layer, §5.3, §5.7),
not the ceil rounding of HeteroFL's code.
"""
from __future__ import annotations

from fedbench.budget import fit_largest, too_small
from fedbench.method import Method, register_method
from fedbench.models import FedModel
from fedbench.plan import Plan
from fedbench.submodel import extract
from fedbench.methods._width import WIDTHS, first_k


@register_method
class Small(Method):
    name = "small"
    description = "FedAvg of the widest uniform-width model that fits the smallest budget (evaluated at that width)"
    paper = "Pfeiffer et al. 2023, Aggregating Capacity in FL through Successive Layer Training (arXiv 2305.17005), baseline"
    budgeted = True
    weighting = "uniform"  # the SLT code averages clients without weights (methods-width-slt.md §5.7)
    trains_batched = True

    def width_plan(self, width: float) -> Plan:
        return Plan.of(first_k(self.ctx.model.full_widths, width, "floor"), label=f"w={width:.4g}")

    def setup(self) -> None:
        budget = self.budgets[0]
        profiler = self.ctx.profiler
        plans = [self.width_plan(w) for w in WIDTHS]
        best = fit_largest(plans, profiler.memory_of, budget * self.ctx.full_memory)
        if best is None:
            raise too_small(budget, profiler.memory_of(plans[0]), self.ctx.full_memory, f"(width {WIDTHS[0]:g})")
        self.small = best

    def plan(self, rnd, client, budget, gen) -> Plan:
        return self.small

    def schedule(self):
        return [({"budget": self.budgets[0]}, self.small)]

    def eval_model(self, global_model: FedModel, rnd: int) -> FedModel:
        return extract(self.ctx.build, global_model, self.small)

    def describe_eval(self) -> str:
        return f"top-1 accuracy of the small model ({self.small.label}) on the test split"
