"""Sub-models from plans: slice global tensors along their channel groups, build real smaller modules.

Every tensor dimension is indexed by at most one group (``FedModel.param_dims``); a plan
gives each group its global indices. Slicing and the aggregator's scatter use the same
open-mesh index, so extraction and masked aggregation are exact inverses.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fedbench.models.base import Dim, FedModel
from fedbench.plan import Plan, Step

Index = tuple[torch.Tensor, ...] | None


def group_indices(plan: Plan, device: torch.device | str) -> dict[str, torch.Tensor]:
    return {g: torch.tensor(ix, dtype=torch.long, device=device) for g, ix in plan.indices}


def mesh(dims: tuple[Dim, ...], shape: torch.Size, idx: Mapping[str, torch.Tensor]) -> Index:
    """Open-mesh advanced index selecting a plan's elements of one tensor (None: the whole tensor)."""
    named = [d for d, g in enumerate(dims) if g is not None and (g if isinstance(g, str) else g[0]) in idx]
    if not named:
        return None
    last = named[-1]
    device = next(iter(idx.values())).device
    parts = []
    for d in range(last + 1):
        g = dims[d] if d < len(dims) else None
        name, rep = (g, 1) if isinstance(g, str) or g is None else g
        if name is None or name not in idx:
            ix = torch.arange(shape[d], device=device)
        elif rep == 1:
            ix = idx[name]
        else:
            ix = (idx[name][:, None] * rep + torch.arange(rep, device=device)).flatten()
        view = [1] * (last + 1)
        view[d] = -1
        parts.append(ix.view(view))
    return tuple(parts)


def build_submodel(build: Callable[..., FedModel], full: FedModel, plan: Plan) -> FedModel:
    """A real module at the plan's widths, holding only the blocks that run."""
    model = build(widths=plan.widths(full.full_widths), **({"rate": plan.rate} if plan.rate != 1.0 else {}))
    keep = plan.blocks()
    if keep is not None:
        for i in range(len(model.blocks)):
            if i not in keep:
                model.blocks[i] = torch.nn.Identity()
    return model


def load_slices(sub: FedModel, global_model: FedModel, plan: Plan) -> None:
    """Copy the plan's slice of every global tensor into the sub-model, in place."""
    dims = global_model.param_dims()
    src = dict(global_model.named_parameters()) | dict(global_model.named_buffers())
    idx = group_indices(plan, next(global_model.parameters()).device)
    with torch.no_grad():
        for name, t in list(sub.named_parameters()) + list(sub.named_buffers()):
            g = src[name]
            ix = mesh(dims.get(name, ()), g.shape, idx)
            t.copy_(g if ix is None else g[ix])


def extract(build: Callable[..., FedModel], global_model: FedModel, plan: Plan) -> FedModel:
    """A new sub-model on the global model's device holding the plan's slice of its current values."""
    model = build_submodel(build, global_model, plan).to(next(global_model.parameters()).device)
    load_slices(model, global_model, plan)
    return model


def set_trainable(model: FedModel, step: Step) -> None:
    """Train only the step's parameters; frozen ones drop gradients left from an earlier step (memory)."""
    for name, p in model.named_parameters():
        p.requires_grad_(step.trains(name))
        if not p.requires_grad:
            p.grad = None


def uploaded(model: FedModel, plan: Plan) -> dict[str, torch.Tensor]:
    """The tensors a client sends back: those trained in any step of its plan."""
    return {n: p.detach() for n, p in model.named_parameters() if any(s.trains(n) for s in plan.steps)}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
