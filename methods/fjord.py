"""FjORD (Horvath, Laskaridis, Almeida, Leontiadis, Venieris, Lane, NeurIPS 2021, arXiv 2102.13451).

Ordered Dropout (OD, paper §3): a width-p sub-model keeps the first ceil(p K) channels of every layer
of K channels (``_width.first_k`` with ceil rounding, as the authors' ``od_conv_forward``), so a width-p
sub-model is a prefix of every wider one (nested). P is a discrete set of widths, by default the paper's
uniform grid {0.2, 0.4, 0.6, 0.8, 1} (``--od-widths``; it must hold 1, the global model's width).

FjORD (paper §4), as fedbench runs it:

- **p_max by measurement.** A client's maximum width p_max is the widest p in P whose *measured* training
  memory (``profiler.memory_of`` of its plan, below) fits its budget, searched once per budget in ``setup``
  (``_width.WidthMethod``); budget 1 trains p_max = 1 unless self-distillation's extra pass needs more; a
  budget below the smallest p's measured memory is refused with that floor (``fedbench.budget.Infeasible``). The paper assigns p_max from a device tier.
- **Per-batch OD sampling.** The client receives its p_max sub-model (first-k slices of the global model) and
  builds one SGD optimizer over it. For every local mini-batch it draws p uniformly from P ∩ (0, p_max] (the
  client's run generator, so a function of seed, round and client) and trains the width-p prefix only: the
  forward runs a real width-p module whose tensors are views of the first-k slices of the p_max tensors
  (``torch.func.functional_call`` on a module built at width p on the meta device, so it holds no weights of its
  own); the gradient lands in the p_max tensors' prefix (zeros elsewhere) and the optimizer steps the whole
  p_max model, as the Flower baseline's ``ODConv2d``/``ODLinear`` (sliced weights, one optimizer over the net).
  ``sampled[client]`` records the widths drawn in the client's latest local training.
- **Self-distillation (optional, off by default as in the authors' Flower baseline, whose default run has none and
  ``+train_mode=fjord_kd`` adds it: ``--self-distill``).** Per batch, as the Flower baseline's
  ``train(know_distill=True)``: the p_max sub-model's cross-entropy on the labels is back-propagated, then the
  sampled width-p model's cross-entropy against the p_max output's softmax (detached) is back-propagated, and
  one optimizer step follows. The Flower baseline (which the authors contributed) leaves it a required switch
  and lists the run without it first; off here so that FjORD is compared with the other width methods on the
  same loss.
- **Aggregation.** A client uploads its whole p_max sub-model; each global element becomes the sample-weighted
  mean over the clients whose p_max prefix holds it (the engine's masked mean; the Flower baseline's
  ``fjord_average``: for each p, the region [:ceil(pK)] averaged over the clients with p_max >= p, weighted by
  examples). Which p a client drew per batch does not change what counts as updated: its whole p_max prefix
  counts (the baseline's choice; with weight decay or momentum those elements change at every step anyway).
  Elements no client's p_max holds keep their value.
- **Evaluation.** The global model at the widest p_max of the run's clients, top-1 accuracy on the test split:
  p = 1 as soon as one client's budget fits the full width (the paper's setting, §5: device tiers up to p = 1),
  and with every client at one p_max < 1 that width, the widest model any device trains or runs (the paper
  evaluates each p a device tier deploys; the SLT authors' FjORD baseline evaluates its server's largest level,
  as their HeteroFL). The full width is not evaluated there: no client ever trains it (at budget 0.25 on
  ResNet-20 / CIFAR-10 its accuracy stays at 0.17-0.26 for 200 rounds). The Flower baseline additionally
  reports the accuracy at every p in P; only the one width is reported here.

How the memory is measured: the plan of a p_max client has one Step per width in P ∩ (0, p_max], named
``p=<width>``; the profiler measures one training step at each (p_max-sized parameters, gradients and SGD state;
width-p activations; with self-distillation, the p_max pass too), and the client's peak is the maximum over
them, so it bounds every batch the client can draw. The steps are not run in order: the batches interleave
them as drawn, and ``TrainResult.samples`` gives the samples trained at each width, so a client-round's FLOPs
count every batch at its own width.

Deviations:
- BatchNorm: the Flower baseline keeps separate running statistics per p (``ODBatchNorm2d``: one BatchNorm2d
  per width without affine, one shared affine weight and bias sliced per width; per-width statistics averaged
  over the clients with p_max >= p) and evaluates with them. fedbench's models keep no running statistics
  (``track_running_stats=False``), so every width normalises with the statistics of its own batch in training
  and at test time (test batches of 500, class-mixed): each width still gets its own statistics, the affine
  weights are shared and sliced as in the baseline.
- The paper's distillation loss is (1 - alpha) CE(p, label) + alpha KL(p, p_max, T); the code's (followed here)
  trains the p_max model on the labels and the width-p model on the p_max softmax only (no alpha, T = 1).
- p_max is chosen by measured memory, not a preset tier; clients are sampled uniformly (the baseline's default
  ``client_selection: random``), not tier-balanced.
- The optimizer is fedbench's SGD (``--lr``, ``--momentum``, ``--weight-decay``) recreated every round, as the
  baseline's per-fit optimizer; the baseline's CIFAR-10 setting is lr 0.1, momentum 0, weight decay 1e-4.
- ``fedbench profile``'s ``train_GFLOPs_per_sample`` sums over a plan's steps, i.e. over every width a client
  may draw; a sample trains at one drawn width (the run's clients.csv FLOPs count that exactly).
- Clients train one at a time (per-batch widths do not batch across clients: ``trains_batched`` is off).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedbench.budget import fit_largest, too_small
from fedbench.errors import ConfigError
from fedbench.method import ClientData, Trainer, TrainResult, register_method
from fedbench.models import FedModel
from fedbench.plan import Plan, Step
from fedbench.submodel import build_submodel, set_trainable
from fedbench.methods._width import Recipe, WidthMethod, first_k

PAPER_WIDTHS = "0.2,0.4,0.6,0.8,1"  # the paper's uniform P for its CNNs (Flower baseline's p_s)


@dataclass(frozen=True)
class FjORDOptions:
    variant: Annotated[Literal["paper"], "which published version to run (FjORD has one: the paper's, "
                       "checked against the Flower baseline)"] = "paper"
    od_widths: Annotated[str, "the set P of Ordered Dropout widths, comma-separated numbers in (0, 1] that include 1 "
                         "(the paper's uniform grid by default)"] = PAPER_WIDTHS
    self_distill: Annotated[bool, "self-distillation from the p_max sub-model to the sampled width every batch "
                            "(paper §4; the Flower baseline's knowledge_distillation)"] = False


def parse_widths(text: str) -> tuple[float, ...]:
    """``--od-widths`` -> P ascending, or the ConfigError naming the flag."""
    try:
        widths = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        widths = []
    if not widths or any(not 0 < w <= 1 for w in widths) or widths[-1] != 1:
        raise ConfigError("--od-widths", f"{text!r} not allowed; allowed: comma-separated numbers in (0, 1] "
                                         f"including 1, e.g. {PAPER_WIDTHS}")
    return tuple(widths)


def width_of(step: Step) -> float:
    """The OD width a step of a FjORD plan trains (its name is ``p=<width>``)."""
    return float(step.name.removeprefix("p="))


def prefix(shape: torch.Size) -> tuple[slice, ...]:
    """The first-k slice of a wider tensor that a tensor of ``shape`` holds (nested first-k widths)."""
    return tuple(slice(0, n) for n in shape)


class ODTrainer(Trainer):
    """One SGD optimizer over the client's p_max sub-model; each step trains the width-``p`` prefix of it
    (``p`` is set per batch by ``FjORD.local_train``; the profiler's stand-in trains its step's width)."""

    def __init__(self, method: "FjORD", model: FedModel, plan: Plan, step: Step, lr: float):
        super().__init__(method, model, plan, step, lr)
        self.p = width_of(step)
        self.p_max = max(width_of(s) for s in plan.steps)

    def forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """The width-p sub-model's logits: the p_max model itself, or a width-p module run on prefix views."""
        if p >= self.p_max:
            return self.model(x)
        shell = self.method.shell(p)
        own = dict(chain(self.model.named_parameters(), self.model.named_buffers()))
        tensors = {n: own[n][prefix(t.shape)] for n, t in chain(shell.named_parameters(), shell.named_buffers())}
        return functional_call(shell, tensors, (x,))

    def loss(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """The step's objective as one tensor (the profiler's FLOPs and saved activations; ``step`` back-propagates
        the two terms of self-distillation one after the other, as the baseline)."""
        x = self.prepare(x, gen)
        if not self.method.options.self_distill:
            return F.cross_entropy(self.forward(x, self.p), y)
        teacher = self.forward(x, self.p_max)
        soft = teacher.detach().float().softmax(1)
        return F.cross_entropy(teacher, y) + F.cross_entropy(self.forward(x, self.p).float(), soft)

    def step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        x = self.prepare(x, gen)
        target = y
        if self.method.options.self_distill:
            teacher = self.forward(x, self.p_max)
            F.cross_entropy(teacher, y).backward()
            target = teacher.detach().float().softmax(1)
            del teacher
        loss = F.cross_entropy(self.forward(x, self.p).float(), target)
        loss.backward()
        if self.method.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.method.grad_clip)
        self.opt.step()
        return loss.detach()


@register_method
class FjORD(WidthMethod):
    name = "fjord"
    description = ("Ordered Dropout: nested first-k sub-models; each client trains a width p drawn per batch from "
                   "P up to the widest p_max that fits its budget; evaluated at the run's widest p_max")
    paper = ("Horvath et al. 2021, FjORD: Fair and Accurate Federated Learning under heterogeneous targets with "
             "Ordered Dropout (NeurIPS 2021, arXiv 2102.13451)")
    Options = FjORDOptions
    # ceil(pK), no Scaler / masked loss / label rows / clipping / sBN; evaluated at the widest p_max (module docstring)
    recipes = {"paper": Recipe(rounding="ceil", eval_width="largest")}
    policy = "first-k channels (nested); per batch a width drawn from P up to p_max"
    trains_batched = False
    weighting = "samples"   # the baseline's fjord_average weights by examples

    def __init__(self, ctx):
        super().__init__(ctx)
        self.P = parse_widths(self.options.od_widths)
        self._shells: dict[float, FedModel] = {}
        self.sampled: dict[int, list[float]] = {}  # client -> widths drawn per batch in its latest local training

    # --- configuration ------------------------------------------------------------------
    def allowed(self, p_max: float) -> tuple[float, ...]:
        """P ∩ (0, p_max]: the widths a p_max client draws from."""
        return tuple(p for p in self.P if p <= p_max)

    def width_plan(self, width: float, indices=None) -> Plan:
        """The plan of a client with p_max = ``width``: its first-k slices, one step per drawable width."""
        return Plan.of(first_k(self.ctx.model.full_widths, width, self.recipe.rounding),
                       steps=tuple(Step(name=f"p={p!r}") for p in self.allowed(width)), label=f"p_max={width:g}")

    def full_plan(self) -> Plan:
        return self.width_plan(1.0)

    def fit_width(self, budget: float) -> float:
        """The widest p in P whose measured memory (as p_max) fits ``budget`` (a fraction of FedAvg's full model)."""
        memory = self.ctx.profiler.memory_of
        best = fit_largest(self.P, lambda p: memory(self.width_plan(p)), budget * self.ctx.full_memory)
        if best is None:
            raise too_small(budget, memory(self.width_plan(self.P[0])), self.ctx.full_memory, f"(p_max {self.P[0]:g})")
        return best

    def shell(self, p: float) -> FedModel:
        """A module built at width p on the meta device (no storage): run with the p_max model's prefix views."""
        if p not in self._shells:
            with torch.device("meta"):
                self._shells[p] = build_submodel(self.ctx.build, self.ctx.model,
                                                 Plan.of(first_k(self.ctx.model.full_widths, p, self.recipe.rounding)))
            self._shells[p].train()
        return self._shells[p]

    def step_shares(self, plan: Plan) -> list[float]:
        """Each batch draws its width uniformly from the plan's steps: FLOPs per sample are their mean."""
        return [1 / len(plan.steps)] * len(plan.steps)

    # --- local training -----------------------------------------------------------------
    def trainer(self, model: FedModel, plan: Plan, step: Step, lr: float, client: int | None = None) -> Trainer:
        return ODTrainer(self, model, plan, step, lr)

    def local_train(self, model: FedModel, data: ClientData, plan: Plan, lr: float,
                    gen: torch.Generator) -> TrainResult:
        """Local epochs over seeded mini-batches; each batch draws p uniformly from P ∩ (0, p_max] and trains the
        width-p prefix. ``samples[i]``: samples trained at the width of ``plan.steps[i]`` (FLOPs per width)."""
        cfg = self.config
        widths = [width_of(s) for s in plan.steps]
        set_trainable(model, plan.steps[-1])
        trainer = self.trainer(model, plan, plan.steps[-1], lr, data.client)
        total, drawn, samples = torch.zeros((), device=data.y.device), [], [0] * len(widths)
        for _ in range(cfg.local_epochs):
            order = torch.randperm(len(data), generator=gen, device=gen.device).to(data.y.device)
            for idx in order.split(cfg.batch_size):
                i = int(torch.randint(len(widths), (), generator=gen, device=gen.device))
                trainer.p = widths[i]
                total += trainer.step(data.x[idx], data.y[idx], gen)
                drawn.append(widths[i])
                samples[i] += len(idx)
        self.sampled[data.client] = drawn
        return TrainResult(loss=float(total) / max(len(drawn), 1), samples=samples)

    # --- evaluation and reports ----------------------------------------------------------
    def notes(self, rounds: int) -> dict:
        return {"P": list(self.P), "p_max": {f"{b:g}": p for b, p in sorted(self.widths.items())},
                "self_distill": self.options.self_distill}
