"""FIARSE (Wu, Wang, Wang, Liu, Su, Gao, NeurIPS 2024, "FIARSE: Model-Heterogeneous Federated Learning via
Importance-Aware Submodel Extraction"), checked against the authors' code (github.com/HarliWu/FIARSE, ``fiarse/``:
``model/model_utils.py``, ``model/resnet_masked.py``, ``server.py``, ``fiarse_layerwise/worker.py``; read, not copied).

A client's sub-model keeps the parameters of largest magnitude: importance = |w|, and a client of sub-model size p
keeps every element whose |w| reaches the threshold t_p, the k-th largest |w| with k = floor(p N) (at least 1).

Two variants (``--variant``); only the second saves memory:

**paper** (default): the element-wise mask as published.

- **Threshold (as the code's ``generate_mask(topk=True)``).** One global threshold over the concatenation of every
  convolution's and linear layer's weight and bias (normalisation layers are never masked, as the code's
  ``MaskedBatchNorm``, ``size = 0``); it is computed from the weights the client receives, i.e. the current
  global model (``importance_mask``). The kept set is {|w| >= t_p}: tied magnitudes at the threshold are all kept.
- **Training (the code's ``MaskedConv2d``/``MaskedLinear`` with ``Bern``).** Every forward uses w * 1[|w| >= t_p]
  with t_p fixed for the round. The gradient is the paper's importance-aware one, which we derive from the code's
  straight-through ``Bern`` rather than reuse: d(w 1[|w| >= t])/dw = 1[|w| >= t] (1 + 2 t |w| / (|w| + t)^2).
  Masked-out elements get a zero gradient; weight decay applies only where the gradient is non-zero (the
  authors' SGD in ``fiarse_layerwise/utils.py``), so with SGD momentum they never change.
- **What is sent.** Down: the sub-model (masked-in values; the client recomputes t_p from them). Up: the
  trained tensors, masked tensors as the elements held at the start of the round. Encoding of a masked tensor
  (``sparse_bytes``): the kept values (dtype size each) plus a bitmap of 1 bit per element of the dense tensor,
  or the dense tensor where that is smaller; unmasked tensors (normalisation) dense. Counted by
  ``Method.sent_bytes``, so runs, ``fedbench profile`` and the audit agree.
- **Aggregation (the code's ``server.py``).** Each element becomes the unweighted mean over the clients whose
  mask held it (``MaskedMean`` element masks); an element no client held keeps its value.
- **Memory, honestly.** The client holds the dense tensors with zeros: the activations, gradients, optimizer
  state and FLOPs are the full model's, plus the masked copies of the weights each forward saves for backward.
  The configuration is fitted by measurement: per budget, the largest p on the 1/64 grid whose measured memory
  fits; every p measures the same, slightly above FedAvg's full model (budget 1; the masked copies), so every
  budget up to 1 is refused with the measured floor (``fedbench.budget.Infeasible``) and only a budget above 1
  (``--memory-budget 1.1``) trains it, at p = 1. The
  papers' sub-model sizes {1/64, 1/16, 1/4, 1} are their nominal budgets; ``fedbench audit`` shows them beside
  the measured memory and bytes.

**structured** (a fedbench variant, not in the paper): channel-level importance. Per budget, the largest width
w on the 1/64 grid whose measured memory fits (``methods._width``); a width-w client holds a real narrower
sub-model whose channels are, per channel group, the ceil(w C) channels of largest importance, the L2 norm of
the weights that produce the channel (every convolution / linear weight whose first dimension is that group),
summed over the groups tied by identity shortcuts, ties to the lower index. Importance is computed from the
current global model (``self.ctx.model``) when the round's plans are made, so every client of a width holds the
same channels in a round and the choice is reproducible. Aggregation: the engine's masked mean, unweighted.

Evaluation: top-1 accuracy of the global model masked at one sub-model size (the paper's, per size). The paper
variant: p = 1, the full model (the only size it trains under a memory budget). The structured variant: the
largest client width of the run, as the channels of largest importance in the global model (what a client of
that width receives next); the full model as soon as one client's budget fits it. At one budget below 1 no client
trains the other channels, and the full model would measure their initial weights.

Deviations:
1. The code's client trains with plain SGD (``--lr``) and the server applies the mean delta with a global learning
   rate (``lr_global``); fedbench's SGD (momentum, weight decay where the gradient is non-zero) and a global rate
   of 1 (the mean of the held values).
2. The code counts an element as sent when its delta is non-zero; here when it was held at the start of the
   round (the same set but for an element that the update left exactly unchanged).
3. The code's mask is re-evaluated against t_p in every forward, so an element that falls below t_p during local
   training drops out; the same here. Elements outside the starting mask never enter (zero gradient).
4. The paper reports the mean accuracy of the global model masked at each sub-model size; fedbench reports one
   size (above): the largest of the run.
5. p comes from measured memory, not a preset size per client; under memory budgets the element-wise form
   trains p = 1 or is refused. The structured variant is not the paper's method.
6. fedbench's models keep no BatchNorm running statistics (test-batch statistics), as the other methods here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedbench.aggregate import MaskedMean
from fedbench.budget import fit_largest, too_small
from fedbench.method import ClientData, Trainer, register_method
from fedbench.models import FedModel, scaled
from fedbench.plan import Plan, Step
from fedbench.submodel import uploaded
from fedbench.methods._width import WIDTHS, Recipe, WidthMethod

PAPER_SIZES = (1 / 64, 1 / 16, 1 / 4, 1.0)  # the README's four sub-model sizes (--model-size 1.0 0.25 0.0625 0.015625)
MASKED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class FIARSEOptions:
    variant: Annotated[Literal["paper", "structured"],
                       "paper: the published element-wise magnitude mask (dense tensors: saves no memory, refused "
                       "below its measured floor); structured: channel-level importance, real narrower sub-models "
                       "(a fedbench variant that saves memory)"] = "paper"


# --- the element-wise mask -------------------------------------------------------------------------------------
def masked_names(model: nn.Module) -> list[str]:
    """Parameters the importance mask covers: weight and bias of every convolution and linear layer (not norms)."""
    return [f"{m_name}.{p_name}" if m_name else p_name for m_name, m in model.named_modules() if isinstance(m, MASKED)
            for p_name, p in m.named_parameters(recurse=False)]


def threshold(tensors: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """t_p: the k-th largest |w| over all ``tensors`` together, k = max(1, floor(p N)) (a 0-dim tensor)."""
    scores = torch.cat([t.detach().abs().flatten().float() for t in tensors])
    k = max(1, min(len(scores), int(len(scores) * p + 1e-9)))
    return torch.topk(scores, k, sorted=True).values[-1]


def importance_mask(named: Mapping[str, torch.Tensor], p: float) -> dict[str, torch.Tensor]:
    """Bool mask per tensor: |w| >= t_p with one threshold over all of them (ties at t_p kept)."""
    t = threshold(list(named.values()), p)
    return {n: w.detach().abs().float() >= t for n, w in named.items()}


def sparse_bytes(numel: int, kept: int, element_size: int) -> int:
    """A masked tensor sent as its kept values plus a 1-bit-per-element bitmap, or dense where that is smaller."""
    return min(numel * element_size, kept * element_size + math.ceil(numel / 8))


class _Importance(torch.autograd.Function):
    """w * 1[|w| >= t]; backward: the importance-aware gradient 1[|w| >= t] (1 + 2 t |w| / (|w| + t)^2)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, t)
        return w * (w.abs() >= t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, t = ctx.saved_tensors
        a = w.abs()
        scale = torch.nan_to_num(1 + 2 * t * a / (a + t) ** 2, nan=1.0, posinf=1.0)
        return grad * (a >= t) * scale, None


class MaskedTrainer(Trainer):
    """One client's SGD on the element-wise masked model: t_p from the weights it received, fixed for the round."""

    def __init__(self, method: "FIARSE", model: FedModel, plan: Plan, step: Step, lr: float):
        own = dict(model.named_parameters())
        self.masked = {n: own[n] for n in masked_names(model) if own[n].requires_grad}
        super().__init__(method, model, plan, step, lr)
        self.t = threshold(list(self.masked.values()), float(plan.option("keep", 1.0))).to(own[next(iter(own))].dtype)
        self.wd = method.config.weight_decay

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """SGD; the masked weights without its weight decay (``step`` decays them where their gradient is non-zero)."""
        cfg, ids = self.method.config, {id(p) for p in self.masked.values()}
        rest = [p for p in self.params if id(p) not in ids]
        groups = [{"params": list(self.masked.values()), "weight_decay": 0.0}] + ([{"params": rest}] if rest else [])
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def loss(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        x = self.prepare(x, gen)
        weights = {n: _Importance.apply(w, self.t) for n, w in self.masked.items()}
        return F.cross_entropy(functional_call(self.model, weights, (x,), {"blocks": self.step_spec.blocks}), y)

    def step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x, y, gen)
        loss.backward()
        if self.wd:
            with torch.no_grad():  # weight decay only where the gradient is non-zero (the authors' SGD)
                for w in self.masked.values():
                    if w.grad is not None:
                        w.grad.add_(torch.where(w.grad != 0, w, 0), alpha=self.wd)
        self.opt.step()
        return loss.detach()


# --- channel-level importance (the structured variant) ----------------------------------------------------------
def channel_importance(model: FedModel) -> dict[str, torch.Tensor]:
    """Per channel group, the L2 norm of the weights producing each channel: every convolution / linear weight
    whose first dimension the group indexes (summed in squares over tied groups by the caller)."""
    dims, params = model.param_dims(), dict(model.named_parameters())
    sq = {g: torch.zeros(c, dtype=torch.float64, device=next(model.parameters()).device)
          for g, c in model.full_widths.items()}
    for name in masked_names(model):
        d = dims.get(name, ())
        if not name.endswith("weight") or not d or d[0] is None:
            continue
        g, rep = (d[0], 1) if isinstance(d[0], str) else d[0]
        if g not in sq:
            continue
        w = params[name].detach().double()
        sq[g] += w.reshape(sq[g].numel(), rep, -1).pow(2).sum((1, 2))
    return sq


def important_channels(model: FedModel, width: float, rounding: str = "ceil") -> dict[str, list[int]]:
    """Per group, the ``scaled(C, width)`` channels of largest importance (ties to the lower index), sorted; groups
    tied by identity shortcuts share one set, chosen by their summed squared importance."""
    sq, full = channel_importance(model), model.full_widths
    leader = {g: tie[0] for tie in model.tied_groups() for g in tie}
    total: dict[str, torch.Tensor] = {}
    for g in full:
        lead = leader.get(g, g)
        total[lead] = total.get(lead, 0) + sq[g]
    out: dict[str, list[int]] = {}
    for g, c in full.items():
        lead = leader.get(g, g)
        if lead not in out:
            k = scaled(c, width, rounding)
            order = sorted(range(c), key=lambda i: (-float(total[lead][i]), i))
            out[lead] = sorted(order[:k])
        out[g] = out[lead]
    return out


@register_method
class FIARSE(WidthMethod):
    name = "fiarse"
    description = ("importance-aware sub-models: the largest-magnitude parameters (paper: element-wise mask, dense "
                   "memory; --variant structured: highest-importance channels, narrower models)")
    paper = ("Wu et al. 2024, FIARSE: Model-Heterogeneous Federated Learning via Importance-Aware Submodel "
             "Extraction (NeurIPS 2024)")
    Options = FIARSEOptions
    recipes = {"paper": Recipe(), "structured": Recipe(rounding="ceil", eval_width="largest")}
    policy = "channels of largest L2 importance in the current global model"
    trains_batched = False  # the paper variant's masked trainer runs one client at a time (one class, both variants)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.element_wise = self.options.variant == "paper"
        self.keep: dict[float, float] = {}         # paper: budget -> p
        self._masks: dict[tuple, dict[str, torch.Tensor]] = {}
        self._channels: dict[tuple, dict[str, list[int]]] = {}

    # --- the global model's state, for caches -------------------------------------------------------------
    def _version(self) -> tuple:
        """Changes whenever the global model's parameters are written (aggregation, a resumed checkpoint)."""
        return tuple(p._version for p in self.ctx.model.parameters())

    def held(self, p: float) -> dict[str, torch.Tensor]:
        """The element mask of a size-p client this round: from the current global model (cached per version)."""
        key = (p, self._version())
        if key not in self._masks:
            params = dict(self.ctx.model.named_parameters())
            self._masks = {key: importance_mask({n: params[n] for n in masked_names(self.ctx.model)}, p)}
        return self._masks[key]

    # --- configuration -------------------------------------------------------------------------------------
    def density_plan(self, p: float) -> Plan:
        """The plan of a size-p client (paper variant): the dense model, p in the plan's options."""
        return Plan(label=f"p={p:.4g}", options=(("keep", float(p)),))

    def full_plan(self) -> Plan:
        return self.density_plan(1.0) if self.element_wise else Plan()

    def setup(self) -> None:
        if not self.element_wise:
            return super().setup()
        memory, full = self.ctx.profiler.memory_of, self.ctx.full_memory
        self.keep = {}
        for b in self.budgets:  # the smallest p first: a budget below it is refused after one measurement
            if memory(self.density_plan(WIDTHS[0])) > b * full:
                raise too_small(b, memory(self.density_plan(WIDTHS[0])), full,
                                f"(p = {WIDTHS[0]:g} of the parameters; the element-wise mask keeps the dense "
                                "tensors, activations and optimizer state)")
            self.keep[b] = fit_largest(WIDTHS, lambda p: memory(self.density_plan(p)), b * full)

    def global_indices(self, width: float) -> dict[str, list[int]]:
        """The ``width`` channels of largest importance in the current global model (cached per version)."""
        key = (width, self._version())
        if key not in self._channels:
            self._channels = {key: important_channels(self.ctx.model, width, self.recipe.rounding)}
        return self._channels[key]

    def indices(self, width, rnd, client, gen):
        return self.global_indices(width)

    def plan(self, rnd: int, client: int, budget: float, gen: torch.Generator) -> Plan:
        if self.element_wise:
            return self.density_plan(self.keep[budget])
        return super().plan(rnd, client, budget, gen)

    def schedule(self) -> list[tuple[dict, Plan]]:
        if not self.element_wise:
            return super().schedule()
        return [({"budget": b, "note": f"element-wise mask, {p:.4g} of the parameters (dense tensors)"},
                 self.density_plan(p)) for b, p in self.keep.items()]

    # --- training, communication, aggregation -------------------------------------------------------------
    def trainer(self, model: FedModel, plan: Plan, step: Step, lr: float, client: int | None = None) -> Trainer:
        return MaskedTrainer(self, model, plan, step, lr) if self.element_wise else super().trainer(
            model, plan, step, lr, client)

    def sent_bytes(self, tensors: Mapping[str, torch.Tensor], plan: Plan) -> int:
        p = plan.option("keep")
        if not self.element_wise or p is None:
            return super().sent_bytes(tensors, plan)
        held = self.held(float(p))
        return sum(sparse_bytes(t.numel(), int(held[n].sum()), t.element_size()) if n in held
                   else t.numel() * t.element_size() for n, t in tensors.items())

    def add_update(self, agg: MaskedMean, plan: Plan, model: FedModel, data: ClientData) -> None:
        p = plan.option("keep")
        if not self.element_wise or p is None:
            return super().add_update(agg, plan, model, data)
        update, held = uploaded(model, plan), self.held(float(p))
        agg.add(plan, update, self.client_weight(data), {n: m for n, m in held.items() if n in update})

    # --- reports -------------------------------------------------------------------------------------------
    def describe_eval(self) -> str:
        if not self.element_wise:
            return super().describe_eval()
        return ("top-1 accuracy of the full global model (p = 1) on the test split, BN layers (if any) with "
                "test-batch statistics")

    def notes(self, rounds: int) -> dict:
        if not self.element_wise:
            return {"variant": "structured", "width": {f"{b:g}": w for b, w in sorted(self.widths.items())}}
        out = {}
        for b, p in sorted(self.keep.items()):
            held = self.held(p)
            kept, total = sum(int(m.sum()) for m in held.values()), sum(m.numel() for m in held.values())
            out[f"{b:g}"] = {"p": p, "kept_fraction": kept / total}
        return {"variant": "paper", "keep": out}
