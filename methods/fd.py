"""Federated Dropout (Caldas, Konečný, McMahan, Talwalkar 2018, arXiv 1812.07210), methods-width-slt.md §3.

Each client trains a random sub-model: in every group (every layer's output channels) a
uniformly random subset of floor(w C) channels, drawn independently per client, per round and
per layer from the client's seeded generator (``_width.random``); groups joined by identity
shortcuts share one draw, so residual streams line up (the SLT authors' FD, §3.2). The width
w is the largest whose measured memory fits the client's budget (``methods._width``). Updates
are merged by the masked mean (each element over the clients holding it); the full-width
model is evaluated with no rescaling (no dropout-style 1/p correction) and BN batch statistics.

The FD paper is available only as its abstract ([NF] in the reference: dropped layers, rates,
whether one subset per round or per client): details follow the SLT authors' re-implementation
(per client, floor, input channels and classes kept). The paper's lossy compression of the
downlink is not implemented.

Index overhead (``plan.index_bytes``, counted in bytes down): ``--index-encoding int32`` (default)
sends the kept indices of every shrunk group as int32 lists (4 bytes each; one list per set of
tied groups); ``seed`` sends one
8-byte seed from which the client re-draws the subsets. int32 is the default because it is
explicit and needs no agreement on the PRNG and draw order, and it is small beside the weights.

Gradient-norm clipping at 1.0 every local step (``paper``), as FedRolex's FD-style baseline and
HeteroFL's code train: the SLT authors' FD does not clip, and without it a model without
normalisation diverges to NaN at small widths (channels re-drawn every round; most updated
elements held by one client, whose diverging values the masked mean copies into the global model).

Variants: ``paper`` (above); ``slt``: the SLT authors' FD exactly (no clipping); ``fedrolex-code``: FD as
re-run in FedRolex's repository (random subsets with HeteroFL's training: ceil, Scaler, masked loss,
label rows, clip 1.0).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

from fedbench.method import register_method
from fedbench.methods._width import HETEROFL_CODE, SLT, WidthMethod, WidthOptions, random


@dataclass(frozen=True)
class FDOptions(WidthOptions):
    index_encoding: Annotated[Literal["int32", "seed"], "how the kept channel indices are sent: int32 lists or a seed"] = "int32"


@register_method
class FederatedDropout(WidthMethod):
    name = "fd"
    description = ("random channel subset per client, round and layer at the widest width that fits "
                   "each budget; index lists counted in bytes down; evaluated at full width")
    paper = ("Caldas et al. 2018, Expanding the Reach of Federated Learning by Reducing Client Resource "
             "Requirements (arXiv 1812.07210)")
    Options = FDOptions
    recipes = {"paper": replace(SLT, clip=1.0), "slt": SLT, "fedrolex-code": HETEROFL_CODE}
    policy = "random channel subset per client, round and layer"

    def indices(self, width, rnd, client, gen):
        return random(self.ctx.model.full_widths, width, gen, self.ctx.model.tied_groups(), self.recipe.rounding)

    def index_bytes(self, indices) -> int:
        full, model = self.ctx.model.full_widths, self.ctx.model
        followers = {g for tie in model.tied_groups() for g in tie[1:]}  # share their leader's list
        shrunk = [len(ix) for g, ix in indices.items() if len(ix) < full[g] and g not in followers]
        if not shrunk:
            return 0
        return 8 if self.options.index_encoding == "seed" else 4 * sum(shrunk)
