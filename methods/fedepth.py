"""FEDEPTH and m-FEDEPTH (Zhang et al. 2023, arXiv 2303.04887; methods-depth-ssl.md §1).

A client splits the model's ordered blocks into consecutive *steps* that each fit its memory
budget and trains them one after another in a round (``local_epochs`` epochs per step, §1.3
"``wk_iters`` local epochs per step"): in step k the stem and earlier blocks run frozen
(no autograd), the step's blocks and a classifier train, deeper blocks do not run.

- FEDEPTH reaches the one shared head through the model's parameter-free ``link`` (§1.2;
  ``preresnet20`` has the authors' links). Models without one get a generic parameter-free
  projection: global average pool, then zero-pad channels symmetrically to the head's width.
- m-FEDEPTH gives every block except the last an auxiliary head (BN on the block's channels,
  global average pool, linear; no ReLU, as ``preresnet_mhead.py``) living in the global model;
  a step ending at block k trains head ``aux.k``, the last step the final head, which alone is
  used at inference. A head is averaged only over the clients that trained it this round
  (§1.4's intent; the authors' x2/x4 group rescaling approximates this and leaves ``linear6``
  diluted by untrained copies — not reproduced).

Partition (§1.3): the authors hand-fix it for PreResNet-20 at budgets 1/6, 1/3, 1/2, 1; here
it is packed greedily by measurement: each step takes the most consecutive blocks whose
measured peak (frozen prefix without autograd, the step's blocks + head training, every
block the client holds, optimizer state, batch; the first step also trains the stem) fits
``budget x full-model memory``. Measured, the authors' 1/6 group does not fit 1/6 (its first
step, stem + block 0 at full resolution, needs about a quarter of the full model's memory),
so such budgets get partial training or are refused with the smallest feasible budget.

Partial training (§1.4, ``--sufficient 0``): when even a one-block step does not fit, the client
skips the fewest leading blocks whose removal leaves the input shape unchanged (so the
residual stream still fits the next block) and trains the rest; the skipped blocks are
neither run, downloaded nor uploaded (the authors upload their unchanged copies, diluting
the average — not reproduced). If no skip helps, the budget is refused. Blocks that no client trains
at any budget of the run are listed in summary.json (``notes.untrained_blocks``, ``warnings``) and
the reports mark the cell: its evaluation runs them at their initial weights.

Mutual distillation (§1.4, ``--sufficient 2``): a client whose budget fits the full model
plus a same-architecture local model (measured, about 2x) trains both jointly, each with
CE + lambda * T^2 * KL(other's detached softmax || own), lambda = 1, T = 1 by default. The local model
starts as a copy of the initial global model, stays with its client across rounds (one per
client: the authors' fallback to one local model shared by all rich clients is a bug, not
reproduced), is never uploaded, and is checkpointed in the method state.

Deviations: one SGD per step (the authors keep one optimizer per round, so the head's momentum
carries across steps); the full-budget client's single step trains everything but the
auxiliary heads (the authors' full group uploads untrained copies of them). m-FEDEPTH's clients
hold the auxiliary heads, so its single full step measures slightly above FedAvg's full model
(budget 1: 1.0002 on ResNet-20, CIFAR-10): at budget 1 it trains in two steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.budget import too_small
from fedbench.method import Method, Trainer, register_method
from fedbench.models import FedModel
from fedbench.plan import Plan, Step
from fedbench.settings import Range

DISTILL = "distill"


@dataclass(frozen=True)
class DepthOptions:
    distill: Annotated[bool, "mutual distillation where model + local model fit the budget"] = True
    distill_weight: Annotated[float, Range(ge=0, le=1000), "lambda of the KL terms (§1.4)"] = 1.0
    distill_temperature: Annotated[float, Range(gt=0, le=100), "softmax temperature of the KL terms (§1.4: plain softmax)"] = 1.0


def span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first},{last}" if last == first + 1 else f"{first}-{last}"


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch-mean KL(softmax(teacher / T) || softmax(student / T)) * T^2, teacher detached."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher.detach() / t, 1), reduction="batchmean") * t * t


class DistillTrainer(Trainer):
    """Deep mutual learning of the client's global sub-model and its local model (one step, joint SGD)."""

    def __init__(self, method: "FeDepth", model: FedModel, plan: Plan, step: Step, lr: float, local: FedModel):
        super().__init__(method, model, plan, step, lr)
        self.local = local.train()
        self.opt.add_param_group({"params": list(local.parameters())})  # same lr, momentum, weight decay

    def loss(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        x = self.prepare(x, gen)  # one augmented batch for both models
        ours = self.method.logits(self.model, x, self.step_spec)
        theirs = self.method.logits(self.local, x, self.step_spec)
        opt = self.method.options
        return (F.cross_entropy(ours, y) + F.cross_entropy(theirs, y)
                + opt.distill_weight * (kl(ours, theirs, opt.distill_temperature)
                                        + kl(theirs, ours, opt.distill_temperature)))

    def modules(self) -> list[nn.Module]:
        return [self.model, self.local]  # the local model counts in the client's measured memory


@register_method
class FeDepth(Method):
    name = "fedepth"
    description = ("consecutive blocks trained one step after another, steps packed by measured memory; "
                   "shared head via parameter-free links; partial training and mutual distillation")
    paper = ("Zhang et al. 2023, Memory-adaptive Depth-wise Heterogeneous Federated Learning "
             "(arXiv 2303.04887), FEDEPTH")
    budgeted = True
    keeps_client_state = True   # the mutual-distillation clients' local models
    Options = DepthOptions

    def __init__(self, ctx):
        super().__init__(ctx)
        self.depth = len(ctx.model.blocks)
        self.plans: dict[float, Plan] = {}
        self.local: dict[int, FedModel] = {}  # per client: its local model (mutual distillation; checkpointed)

    # --- how a step reaches a classifier (m-FEDEPTH overrides) ----------------------------
    def route(self, last: int) -> str:
        """Step.name of a step ending at block ``last``: the final head, or the link to it."""
        return "head" if last == self.depth - 1 else "link"

    def head_of(self, route: str) -> str:
        """Parameter prefix of the classifier a step trains."""
        return "head"

    def classify(self, model: FedModel, features: torch.Tensor, route: str) -> torch.Tensor:
        return model.forward_head(self.link(model, features) if route == "link" else features)

    def link(self, model: FedModel, x: torch.Tensor) -> torch.Tensor:
        """The model's parameter-free link to the head's input, else pool + symmetric channel zero-pad."""
        if hasattr(model, "link"):
            return model.link(x)
        target = self.shapes[-1]
        if x.dim() > 2:
            x = x.mean(dim=tuple(range(2, x.dim())), keepdim=len(target) > 1)
        pad = target[0] - x.shape[1]
        return F.pad(x, (0, 0) * (x.dim() - 2) + (pad // 2, pad - pad // 2))

    def logits(self, model: FedModel, x: torch.Tensor, step: Step) -> torch.Tensor:
        return self.classify(model, model.forward_features(x, step.blocks), step.name)

    def loss(self, model, x, y, plan, step):
        return F.cross_entropy(self.logits(model, x, step), y)

    # --- partitions -----------------------------------------------------------------------
    def step_for(self, first: int, last: int, start: int) -> Step:
        """Train blocks first..last (+ the stem in the first step) and a head; run blocks start..last."""
        route = self.route(last)
        trainable = (("stem",) if first == start else ()) + tuple(
            f"blocks.{i}" for i in range(first, last + 1)) + (self.head_of(route),)
        return Step(blocks=tuple(range(start, last + 1)), trainable=trainable, name=route)

    def full_plan(self) -> Plan:
        return Plan(steps=(self.step_for(0, self.depth - 1, 0),), label=f"[{span(0, self.depth - 1)}]")

    def step_memory(self, first: int, last: int, start: int) -> int:
        """Measured peak of one step on a client holding blocks start.. (deeper ones held, not run)."""
        held = Step(blocks=tuple(range(start, self.depth)), trainable=(), name="held")
        return self.ctx.profiler.measure(Plan(steps=(self.step_for(first, last, start), held)), 0).peak

    def pack(self, start: int, cap: float) -> list[tuple[int, int]] | None:
        """Greedy consecutive steps from block ``start``, each measured within ``cap`` bytes.

        A step starts with one block (None if that alone does not fit), takes all remaining
        blocks if they fit, else grows one block at a time while it fits.
        """
        spans, first, end = [], start, self.depth - 1
        while first <= end:
            if self.step_memory(first, first, start) > cap:
                return None
            last = end if self.step_memory(first, end, start) <= cap else first
            while last < end - 1 and self.step_memory(first, last + 1, start) <= cap:
                last += 1
            spans.append((first, last))
            first = last + 1
        return spans

    def partition_plan(self, spans: list[tuple[int, int]], start: int) -> Plan:
        label = " ".join(f"[{span(a, b)}]" for a, b in spans)
        if start:
            label = f"skip {span(0, start - 1)} | {label}"
        return Plan(steps=tuple(self.step_for(a, b, start) for a, b in spans), label=label)

    def resolve(self, budget: float) -> Plan:
        cap = budget * self.ctx.full_memory
        full = self.full_plan()
        if self.options.distill and budget > 1:
            plan = Plan(steps=full.steps, label=f"{full.label} + local model", options=((DISTILL, True),))
            if self.ctx.profiler.memory_of(plan) <= cap:
                return plan
        for start in self.starts:
            spans = self.pack(start, cap)
            if spans is not None:
                return self.partition_plan(spans, start)
        start = self.starts[-1]  # the most blocks skipped, one block per step
        smallest = max(self.step_memory(i, i, start) for i in range(start, self.depth))
        skip = f", blocks {span(0, start - 1)} skipped" if start else ""
        raise too_small(budget, smallest, self.ctx.full_memory, f"(one block per step{skip})")

    def setup(self) -> None:
        with torch.device("meta"), torch.no_grad():
            probe = self.ctx.build()
            x = probe.stem(torch.zeros((1, *self.dataset.train_x.shape[1:])))
            self.shapes = [x.shape[1:]]  # stem output, then each block's output
            for block in probe.blocks:
                x = block(x)
                self.shapes.append(x.shape[1:])
        # leading blocks that can be skipped: the stem's output also fits the next block's input
        self.starts = [s for s in range(self.depth) if self.shapes[s] == self.shapes[0]]
        self.plans = {b: self.resolve(b) for b in self.budgets}
        if any(p.option(DISTILL) for p in self.plans.values()):
            self.initial = self.twin(self.ctx.model)  # local models start as the initial global model

    def plan(self, rnd, client, budget, gen) -> Plan:
        return self.plans[budget]

    def schedule(self):
        full = self.ctx.full_memory
        rows = []
        for budget, plan in self.plans.items():
            peaks = " ".join(f"{self.ctx.profiler.measure(plan, i).peak / full:.3f}" for i in range(len(plan.steps)))
            note = f"per-step memory/full: {peaks}"
            if plan.steps[0].blocks[0] > 0:
                note += f"; partial training: blocks {span(0, plan.steps[0].blocks[0] - 1)} skipped"
            if plan.option(DISTILL):
                note += "; mutual distillation with a local model (never uploaded)"
            rows.append(({"budget": budget, "note": note}, plan))
        return rows

    # --- mutual distillation --------------------------------------------------------------
    def twin(self, model: FedModel) -> FedModel:
        """A same-architecture copy of a full-width model, on its device (no RNG used)."""
        with torch.device("meta"):
            copy = self.ctx.build()
        copy = copy.to_empty(device=next(model.parameters()).device)
        copy.load_state_dict(model.state_dict())
        return copy.train()

    def trainer(self, model, plan, step, lr, client=None) -> Trainer:
        if not plan.option(DISTILL):
            return super().trainer(model, plan, step, lr, client)
        if client is None:
            return DistillTrainer(self, model, plan, step, lr, self.twin(model))  # the profiler's stand-in
        if client not in self.local:  # its first distillation round: a copy of the initial global model
            self.local[client] = self.twin(self.initial)
        return DistillTrainer(self, model, plan, step, lr, self.local[client])

    def state_dict(self) -> dict:
        return {"local": {c: m.state_dict() for c, m in self.local.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.local = {}
        for client, weights in state.get("local", {}).items():
            self.local[int(client)] = model = self.twin(self.initial)
            model.load_state_dict(weights)

    def describe_eval(self) -> str:
        return "top-1 accuracy of the full-depth global model (shared head) on the test split"

    def untrained(self) -> list[int]:
        """Blocks that no client trains at any budget of the run (partial training everywhere)."""
        trained = {i for plan in self.plans.values() for step in plan.steps
                   for i in range(self.depth) if step.trains(f"blocks.{i}")}
        return [i for i in range(self.depth) if i not in trained]

    def notes(self, rounds: int) -> dict:
        return {"untrained_blocks": self.untrained()}

    def warnings(self, rounds: int) -> list[str]:
        blocks = self.untrained()
        if not blocks:
            return []
        return [f"blocks {span(blocks[0], blocks[-1])} are trained by no client at these budgets (partial "
                "training), yet evaluation runs them at their initial weights"]


class AuxHead(nn.Module):
    """m-FEDEPTH auxiliary classifier: BN on the block's channels, global average pool, linear."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels, track_running_stats=False)  # BN2d over (N, C, H*W)
        self.linear = nn.Linear(channels, classes)
        nn.init.kaiming_normal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x.flatten(2) if x.dim() > 2 else x)
        return self.linear(h.mean(-1) if h.dim() == 3 else h)


def out_channels(block: nn.Module) -> int:
    """Channels of a block's output: its last conv/linear/norm layer's width."""
    widths = [getattr(m, a) for m in block.modules() for a in ("out_channels", "out_features", "num_features")
              if hasattr(m, a)]
    if not widths:
        raise ValueError(f"cannot tell the output channels of block {block.__class__.__name__}")
    return widths[-1]


def with_aux_heads(model: FedModel) -> FedModel:
    """Add ``aux`` (one head per block but the last) to a model; they are never sliced (not in param_dims)."""
    classes = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1].out_features
    model.aux = nn.ModuleList(AuxHead(out_channels(b), classes) for b in list(model.blocks)[:-1])
    return model


@register_method
class MFeDepth(FeDepth):
    name = "mfedepth"
    description = ("FEDEPTH with an auxiliary head per step instead of links (final head at inference); "
                   "auxiliary heads averaged only over the clients that trained them")
    paper = ("Zhang et al. 2023, Memory-adaptive Depth-wise Heterogeneous Federated Learning "
             "(arXiv 2303.04887), m-FEDEPTH")

    @classmethod
    def build_global(cls, build):
        return with_aux_heads(build())

    @classmethod
    def client_builder(cls, build):
        return lambda **kw: with_aux_heads(build(**kw))

    def route(self, last: int) -> str:
        return "head" if last == self.depth - 1 else f"aux.{last}"

    def head_of(self, route: str) -> str:
        return route

    def classify(self, model, features, route):
        return model.forward_head(features) if route == "head" else model.get_submodule(route)(features)

    def describe_eval(self) -> str:
        return "top-1 accuracy of the full-depth global model through its final head on the test split"
