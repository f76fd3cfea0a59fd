"""Exclusive FedAvg: only the clients that can train the full model take part (a baseline; no paper).

The baseline every memory-adaptive FL paper argues against (e.g. HeteroFL, Diao et al. 2021,
and SLT, Pfeiffer et al. 2023, discuss it as excluding the constrained clients; it has no paper
of its own): a client whose budget fits the full model's *measured* training peak (budget >= 1)
trains it with FedAvg's local SGD; every other client sits out every round (``EXCLUDED``: it
trains nothing, receives and sends nothing, and is counted as excluded in the outputs). The
server averages the participants' updates (sample-weighted, as FedAvg).

Its cost is not memory but data: the samples of the excluded clients never reach the model, so
with non-IID partitions whole classes or styles may be missing. Evaluation: the full global model.
"""
from __future__ import annotations

from fedbench.budget import too_small
from fedbench.method import Method, register_method
from fedbench.plan import EXCLUDED, Plan


@register_method
class FedAvgExclusive(Method):
    name = "fedavg-exclusive"
    description = ("FedAvg of the full model among the clients whose budget fits it; the others sit out "
                   "every round (their data is lost to training)")
    paper = "baseline without a paper (excluding constrained clients); FedAvg: McMahan et al. 2017 (arXiv 1602.05629)"
    budgeted = True
    trains_batched = True   # the participants train exactly as FedAvg (default loop, trainer and loss)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.trains: dict[float, bool] = {}

    def setup(self) -> None:
        full = self.ctx.full_memory  # budget 1: FedAvg's full model, this method's full plan
        self.trains = {b: full <= b * full for b in self.budgets}
        if not any(self.trains.values()):
            raise too_small(max(self.budgets), full, self.ctx.full_memory,
                            "(the full model; every client would sit out)")

    def plan(self, rnd, client, budget, gen) -> Plan:
        return self.full_plan() if self.trains[budget] else EXCLUDED

    def schedule(self):
        """The full model for the budgets that train (the others train nothing, so nothing to measure)."""
        sitting = [b for b, t in self.trains.items() if not t]
        note = f"budgets {', '.join(f'{b:g}' for b in sitting)} sit out" if sitting else ""
        return [({"budget": b, "note": note}, self.full_plan()) for b, t in self.trains.items() if t]
