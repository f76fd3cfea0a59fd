"""Masked averaging: a running element-weighted sum in global coordinates (DESIGN.md, aggregate).

Each global element becomes the weighted mean over the clients that held it this round;
elements no client held keep their value. With full plans this is exactly FedAvg.

Sums and weights accumulate in float64: a weighted float32 value is exact there, and so, in practice,
is the sum of a round's few clients, so the result does not depend on the order in which clients
(or the processes of ``--processes``/torchrun) add up; one rounding to float32 at the end.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fedbench.models.base import FedModel
from fedbench.plan import Plan
from fedbench.submodel import group_indices, mesh

ACCUMULATE = torch.float64


class MaskedMean:
    """Fold client updates in as they arrive; never holds more than one sum and one weight per tensor."""

    def __init__(self, global_model: FedModel):
        self.model = global_model
        self.dims = global_model.param_dims()
        self.params = dict(global_model.named_parameters())
        self.sum: dict[str, torch.Tensor] = {}
        self.weight: dict[str, torch.Tensor] = {}

    def add(self, plan: Plan, update: Mapping[str, torch.Tensor], weight: float,
            masks: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one client's trained tensors (sub-model coordinates), weighted by ``weight``.

        ``masks`` optionally weights elements of a tensor (same shape as the update), e.g.
        HeteroFL's classifier rows of the client's own labels.
        """
        idx = group_indices(plan, next(iter(self.params.values())).device)
        for name, u in update.items():
            g = self.params[name]
            u = u.to(ACCUMULATE)
            w = torch.full_like(u, weight) if masks is None or name not in masks else weight * masks[name].to(u)
            if name not in self.sum:
                self.sum[name] = torch.zeros_like(g, dtype=ACCUMULATE)
                self.weight[name] = torch.zeros_like(g, dtype=ACCUMULATE)
            ix = mesh(self.dims.get(name, ()), g.shape, idx)
            if ix is None:
                self.sum[name] += w * u
                self.weight[name] += w
            else:
                self.sum[name][ix] += w * u
                self.weight[name][ix] += w

    def all_reduce(self, reduce: Callable[[torch.Tensor], None]) -> None:
        """Sum the sums and weights of every process in place (``reduce`` all-reduces one flat tensor).

        Every process contributes every tensor (zeros where it added nothing); tensors no process
        added to stay out of the result, as in a one-process round.
        """
        names = list(self.params)
        for n in names:
            if n not in self.sum:
                self.sum[n] = torch.zeros_like(self.params[n], dtype=ACCUMULATE)
                self.weight[n] = torch.zeros_like(self.params[n], dtype=ACCUMULATE)
        parts = [t for n in names for t in (self.sum[n], self.weight[n])]
        flat = torch.cat([t.detach().flatten() for t in parts])
        reduce(flat)
        for t, chunk in zip(parts, flat.split([t.numel() for t in parts])):
            t.copy_(chunk.view_as(t))
        for n in names:
            if not self.weight[n].any():
                del self.sum[n], self.weight[n]

    def result(self) -> dict[str, torch.Tensor]:
        """New values of every tensor any client sent; held-by-none elements keep their value."""
        return {n: torch.where(self.weight[n] > 0, self.sum[n] / self.weight[n].clamp_min(1e-12),
                               self.params[n].detach().to(ACCUMULATE)).to(self.params[n].dtype)
                for n in self.sum}

    def apply(self) -> list[str]:
        """Write the result into the global model; returns the names of the tensors updated."""
        result = self.result()
        with torch.no_grad():
            for name, value in result.items():
                self.params[name].copy_(value)
        return list(result)
