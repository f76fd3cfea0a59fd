"""FedRolex (Alam, Liu, Yan, Zhang, NeurIPS 2022, arXiv 2212.01548), methods-width-slt.md §4.

Each client trains a rolling sub-model (§3, Eq. 4): in round j every group of K channels
keeps floor(w K) consecutive cyclic indices starting at j mod K (``_width.rolling``); the
window is shared by all clients of a round (narrower clients hold a prefix of it), advances
one channel per round (step r = 1, A.4) and covers every channel equally over K rounds: a run of
R rounds trains only min(K, k + R - 1) of a group's K channels (k = the widest client's), the rest
enter evaluation at their initial weights. summary.json gives that coverage per group
(``notes.coverage``) and a warning (shown when the run starts, marked in reports) when it is below
1; the paper ran 2,500+ rounds. The
width w is the largest whose measured memory fits the client's budget (``methods._width``).
The paper's network adds a Scaler after each convolution (§4: ``plan.rate = w``) and uses
static BN, which in its code means batch statistics at test time too (no statistics pass).
Aggregation is the selective average of Eq. 10 (each element over the clients holding it);
evaluated at full width. Where the paper is silent, the authors' code (built on HeteroFL's)
is followed: HeteroFL's masked cross-entropy, classifier rows averaged over the clients holding
each label, and gradient-norm clipping 1.0 (without it the Scaler makes our norm-free ``fedavg-cnn``
diverge at lr 0.05).

Quirks of the official code, documented rather than copied: its window moves backwards
(``roll`` right by ``j mod K``; direction is immaterial); it keeps ceil(w K) channels, not the
paper's floor (variant ``fedrolex-code``); ``combine`` weights 1-D tensors and classifier rows
by a cumulative per-element update counter (not implemented: near-uniform under rolling, and
the paper reports the unweighted scheme, Table 5). Clients are averaged without weights (the
paper's p_m = 1/N; ``--weighting samples`` weights by size). The paper's per-round
re-drawn capacities ("dynamic") are ``--budget-assignment per-round``.
Variants: ``paper`` (above), ``fedrolex-code`` (ceil), ``slt`` (the SLT authors' FedRolex:
floor widths, no Scaler, no masked loss, no label rows, no clipping, §5.7).
"""
from __future__ import annotations

from dataclasses import replace

from fedbench.method import register_method
from fedbench.models import scaled
from fedbench.methods._width import HETEROFL_CODE, SLT, WidthMethod, rolling


@register_method
class FedRolex(WidthMethod):
    name = "fedrolex"
    description = ("rolling window of channels (advances one channel per round, shared by the round's "
                   "clients) at the widest width that fits each budget; evaluated at full width")
    paper = ("Alam et al. 2022, FedRolex: Model-Heterogeneous Federated Learning with Rolling "
             "Sub-Model Extraction (arXiv 2212.01548)")
    recipes = {"paper": replace(HETEROFL_CODE, rounding="floor"), "fedrolex-code": HETEROFL_CODE, "slt": SLT}
    policy = "rolling window from channel (round mod C); round 1 shown"

    def indices(self, width, rnd, client, gen):
        return rolling(self.ctx.model.full_widths, width, rnd, self.ctx.model.tied_groups(), self.recipe.rounding)

    def coverage(self, rounds: int) -> dict[str, float]:
        """Per channel group, the fraction of its channels that the widest client's window covers in ``rounds``
        rounds (the window of round j starts at j mod C; narrower clients hold a prefix of it)."""
        widest = max(self.widths.values())
        full = self.ctx.model.full_widths
        if widest >= 1:
            return {g: 1.0 for g in full}
        return {g: min(c, scaled(c, widest, self.recipe.rounding) + rounds - 1) / c for g, c in full.items()}

    def notes(self, rounds: int) -> dict:
        return {"coverage": self.coverage(rounds)}

    def warnings(self, rounds: int) -> list[str]:
        short = {g: f for g, f in self.coverage(rounds).items() if f < 1}
        if not short:
            return []
        worst = min(short, key=short.get)
        return [f"in {rounds} rounds the rolling window trains only part of {len(short)} channel groups (least: "
                f"{short[worst]:.0%} of {worst}); the rest are evaluated at their initial weights (a group of C "
                f"channels needs about C rounds)"]
