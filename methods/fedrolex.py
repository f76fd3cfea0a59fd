"""FedRolex (Alam, Liu, Yan, Zhang, NeurIPS 2022, arXiv 2212.01548), methods-width-slt.md §4.

Each client trains a rolling sub-model (§3, Eq. 4): in round j every group of K channels
keeps floor(w K) consecutive cyclic indices starting at j mod K (``_width.rolling``); the
window is shared by all clients of a round (narrower clients hold a prefix of it), advances
one channel per round (step r = 1, A.4) and covers every channel equally over K rounds. The
width w is the largest whose measured memory fits the client's budget (``methods._width``).
The paper's network adds a Scaler after each convolution (§4: ``plan.rate = w``) and uses
static BN, which in its code means batch statistics at test time too (no statistics pass).
Aggregation is the selective average of Eq. 10 (each element over the clients holding it);
evaluated at full width. Where the paper is silent, the authors' code (built on HeteroFL's)
is followed: HeteroFL's masked cross-entropy, classifier rows averaged over the clients holding
each label, and gradient-norm clipping 1.0 (without it the Scaler makes our norm-free ``cnn``
diverge at lr 0.05).

Quirks of the official code, documented rather than copied: its window moves backwards
(``roll`` right by ``j mod K``; direction is immaterial); it keeps ceil(w K) channels, not the
paper's floor (variant ``fedrolex-code``); ``combine`` weights 1-D tensors and classifier rows
by a cumulative per-element update counter (not implemented: near-uniform under rolling, and
the paper reports the unweighted scheme, Table 5). Clients are averaged with ``--weighting``
(the paper: unweighted, p_m = 1/N; identical for iid/shard partitions). The paper's per-round
re-drawn capacities ("dynamic") are ``--budget-assignment per-round``.
Variants: ``paper`` (above), ``fedrolex-code`` (ceil), ``slt`` (the SLT authors' FedRolex:
floor widths, no Scaler, no masked loss, no label rows, no clipping, §5.7).
"""
from __future__ import annotations

from dataclasses import replace

from fedbench.method import register_method
from methods._width import HETEROFL_CODE, SLT, WidthMethod, rolling


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
