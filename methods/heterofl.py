"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021, arXiv 2010.01264), methods-width-slt.md §2.

Each client trains the first-k sub-model (ceil(w C) channels of every group, §2.1: nested,
every narrower model is the top-left corner of a wider one) at the largest width whose
measured memory fits its budget (``methods._width``). Following the paper and its code (§2.2-2.3):

- static BN: BN normalises with batch statistics while training (our models keep no running
  statistics); before each evaluation the sBN pass runs the whole training set through a copy
  of the global model in train mode, accumulating cumulative running statistics, and the copy
  is evaluated in eval mode with them (``_width.static_bn``; the code's ``stats()``);
- the Scaler: ``plan.rate = w / g`` (client width / global width), identity at evaluation;
- the masked cross-entropy: logits of classes not in the client's label set are set to 0;
- classifier rows (weight and bias) averaged only over the clients holding that label;
- gradient-norm clipping at 1.0 every local step (from the authors' code).

- the global model is the largest level present in the run (the code's ``global_model_rate``,
  §2.1): its width g is the largest client width, which is what is evaluated (g = 1 as soon as one
  client's budget fits the full model); with every client at one budget, the width-w model;
- clients averaged without weights (the code; ``--weighting samples`` weights by size).

Deviations: the budget is measured training memory, not a preset complexity level a-e (§2.4), so
widths come from a 1/64 grid; the sBN pass uses un-augmented training images in batches of 500, by default
the first 5,000 of the training split (its fixed class-mixed order), not all of them: on CIFAR-10 the pass
over all 50,000 was a third of a run's time, and the statistics of 5,000 give the same accuracy within noise
(README, "sBN statistics"); ``--sbn-samples 0`` runs the paper's pass over the whole split.
Fixed client groups per budget are the paper's "fix" mode; its "dynamic" mode (a client's level
re-drawn every round) is ``--budget-assignment per-round``.

Variants (``--variant``): ``paper`` (above); ``fedrolex-code``: HeteroFL as re-run in FedRolex's
repository (same training, no sBN pass: test-batch statistics); ``slt``: the SLT authors'
baseline (floor widths, no Scaler, no masked loss, no label rows, no clipping, no sBN pass,
evaluated at the largest client width, §5.7).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

from fedbench.method import register_method
from fedbench.settings import Range
from fedbench.methods._width import HETEROFL_CODE, SLT, WidthMethod, WidthOptions


@dataclass(frozen=True)
class HeteroFLOptions(WidthOptions):
    sbn_samples: Annotated[int, Range(ge=0), "training images in the sBN statistics pass before each evaluation "
                           "(the first N of the split's class-mixed order); 0: all of them, the paper's pass"] = 5000


@register_method
class HeteroFL(WidthMethod):
    name = "heterofl"
    description = ("first-k channels at the widest width that fits each budget; sBN, Scaler, "
                   "label-masked loss and label-wise classifier rows; evaluated at the largest client width")
    paper = ("Diao et al. 2021, HeteroFL: Computation and Communication Efficient Federated Learning "
             "for Heterogeneous Clients (arXiv 2010.01264)")
    Options = HeteroFLOptions
    recipes = {"paper": replace(HETEROFL_CODE, sbn=True, eval_width="largest"), "fedrolex-code": HETEROFL_CODE,
               "slt": replace(SLT, eval_width="largest")}
    policy = "first-k channels (nested across widths)"

    def sbn_samples(self) -> int:
        return self.options.sbn_samples
