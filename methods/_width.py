"""Width-based partial training (HeteroFL, FedRolex, Federated Dropout; SLT's and small's heads): what they share.

A client with budget b trains a width-w sub-model: w is the largest width on the ``WIDTHS``
grid whose *measured* training memory (``profiler.memory_of``) fits b x the full model's
memory (searched once per budget a client can receive, in ``setup``; the full width where
its step costs no more than FedAvg's). The methods differ only in which channels a width-w client holds (the index policy:
``first_k``, ``rolling``, ``random``) and in a few training details, collected per published
variant in a ``Recipe`` (methods-width-slt.md §2.3, §3.2, §4.2, §5.7):

- ``rounding``: channels kept per group, ceil(w C) (HeteroFL/FedRolex code) or floor (FedRolex
  Eq. 4, SLT's baselines);
- ``scaler``: HeteroFL's Scaler, ``plan.rate = w / g`` (client width / global width g);
- ``masked_loss``: logits of classes the client does not hold are set to 0 before the cross-entropy;
- ``label_rows``: classifier rows (weight and bias) are averaged only over the clients holding that label;
- ``clip``: gradient-norm clipping at every local step (0: none);
- ``sbn``: HeteroFL's static-BN statistics pass before evaluation (``static_bn``);
- ``eval_width``: the global width g: the full model, or the largest client width of the run (HeteroFL's
  code: the global model is the largest level present, methods-width-slt.md §2.1; SLT's HeteroFL), which is
  what is evaluated.

Every index policy keeps ``scaled(C, w, rounding)`` channels of a group of C channels and returns
sorted global indices. Groups joined by identity shortcuts (``FedModel.tied_groups()``) get one
shared index set, so residual additions line up (methods-width-slt.md §6 item 2).

Aggregation is the engine's masked mean (each element over the clients holding it), unweighted
by default as the three papers' code averages (``weighting = "uniform"``; ``--weighting samples``
weights by client size).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.aggregate import MaskedMean
from fedbench.budget import fit_largest, too_small
from fedbench.data import Dataset, normalize
from fedbench.errors import ConfigError
from fedbench.method import ClientData, Method
from fedbench.models import FedModel, scaled
from fedbench.plan import Plan, Step
from fedbench.submodel import extract, uploaded

WIDTHS = tuple(k / 64 for k in range(1, 65))  # the width grid searched by width-based methods


# --- index policies: which global channels of each group a width-w client holds ---------------

def first_k(full: Mapping[str, int], width: float, rounding: str = "ceil") -> dict[str, range]:
    """The first ceil/floor(w * C) channels of every group (HeteroFL §2.1; nested sub-models)."""
    return {g: range(scaled(c, width, rounding)) for g, c in full.items()}


def _tied(full: Mapping[str, int], ties: Sequence[Sequence[str]], width: float, rounding: str,
          choose: Callable[[int, int], list[int]]) -> dict[str, list[int]]:
    """``choose(C, k)`` once per independent group (in ``full``'s order); tied groups share their leader's set."""
    leader = {g: tie[0] for tie in ties for g in tie}
    for tie in ties:
        if len({full[g] for g in tie}) > 1:
            raise ValueError(f"tied groups {tie} have different widths")
    out: dict[str, list[int]] = {}
    for g in full:
        lead = leader.get(g, g)
        if lead not in out:
            out[lead] = sorted(choose(full[lead], scaled(full[lead], width, rounding)))
        out[g] = out[lead]
    return out


def rolling(full: Mapping[str, int], width: float, rnd: int, ties: Sequence[Sequence[str]] = (),
            rounding: str = "floor") -> dict[str, list[int]]:
    """FedRolex's window (Alam et al. 2022, Eq. 4): k consecutive cyclic indices from ``rnd mod C``.

    Shared by every client of a round (a narrower client holds a prefix of the same window);
    the window advances one channel per round, so every channel is covered over C rounds.
    """
    return _tied(full, ties, width, rounding, lambda c, k: [(rnd + i) % c for i in range(k)])


def random(full: Mapping[str, int], width: float, gen: torch.Generator, ties: Sequence[Sequence[str]] = (),
           rounding: str = "floor") -> dict[str, list[int]]:
    """Federated Dropout's subset (Caldas et al. 2018; SLT's FD, methods-width-slt.md §3.2):
    a uniform random k-subset per group, drawn from ``gen`` (per client, round and layer)."""
    return _tied(full, ties, width, rounding,
                 lambda c, k: torch.randperm(c, generator=gen, device=gen.device)[:k].tolist())


@dataclass(frozen=True)
class Recipe:
    """Training details of one published variant of a width method (see the module docstring)."""

    rounding: str = "ceil"
    scaler: bool = False
    masked_loss: bool = False
    label_rows: bool = False
    clip: float = 0.0
    sbn: bool = False
    eval_width: str = "full"   # the global width: "full" or "largest" (client width of the run)


# HeteroFL's training (§2.1-2.3; code: ceil, Scaler, masked CE, label rows, clip 1.0). FedRolex's repository
# trains HeteroFL, FD and FedRolex this way and evaluates without the sBN pass (§4.2): variant "fedrolex-code".
HETEROFL_CODE = Recipe(rounding="ceil", scaler=True, masked_loss=True, label_rows=True, clip=1.0)
# The SLT authors' baselines (§5.7): floor widths, no Scaler, no masked loss, no label rows, no sBN, no clipping.
SLT = Recipe(rounding="floor")


@dataclass(frozen=True)
class WidthOptions:
    variant: Annotated[Literal["paper", "fedrolex-code", "slt"],
                       "which published version to run (each method's docstring describes its variants)"] = "paper"


def classifier(model: FedModel) -> tuple[str, str]:
    """Parameter names (weight, bias) of the output layer: the head's last ``nn.Linear``."""
    linears = [n for n, m in model.head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__}.head has no nn.Linear output layer")
    prefix = ".".join(p for p in ("head", linears[-1]) if p)
    return f"{prefix}.weight", f"{prefix}.bias"


def label_mask(labels: torch.Tensor | None, num_classes: int, device: torch.device) -> torch.Tensor:
    """Bool [num_classes]: the classes a client holds (all when ``labels`` is None)."""
    if labels is None:
        return torch.ones(num_classes, dtype=torch.bool, device=device)
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    mask[labels.to(device)] = True
    return mask


@torch.no_grad()
def static_bn(model: FedModel, dataset: Dataset, samples: int = 0, batch_size: int = 500) -> FedModel:
    """HeteroFL's sBN statistics (§2.3, the code's ``stats()``): a copy of ``model`` whose BN
    layers track cumulative running statistics (``momentum=None``), filled by one pass over the
    (un-augmented) training set in train mode, or its first ``samples`` images (0: all); evaluated in
    eval mode it uses them. Returns ``model`` itself when it has no BN layer."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if not any(isinstance(m, norms) for m in model.modules()):
        return model
    model = copy.deepcopy(model).train()
    device = next(model.parameters()).device
    for m in model.modules():
        if isinstance(m, norms):
            m.track_running_stats, m.momentum = True, None
            m.register_buffer("running_mean", torch.zeros(m.num_features, device=device))
            m.register_buffer("running_var", torch.ones(m.num_features, device=device))
            m.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
    end = min(samples or len(dataset.train_y), len(dataset.train_y))
    for i in range(0, end, batch_size):
        model(normalize(dataset.train_x[i:min(i + batch_size, end)], dataset))
    return model


class WidthMethod(Method):
    """Base of the width methods: budget -> width by measurement, plans, Recipe-driven training."""

    Options = WidthOptions
    budgeted = True
    trains_batched = True
    weighting = "uniform"
    recipes: ClassVar[dict[str, Recipe]] = {}
    policy: ClassVar[str] = ""   # how a width-w client's channels are chosen (shown by ``fedbench profile``)

    def __init__(self, ctx):
        super().__init__(ctx)
        if self.options.variant not in self.recipes:
            raise ConfigError("--variant", f"{self.options.variant!r} not allowed for {self.name}; "
                              f"allowed: {', '.join(self.recipes)}")
        self.recipe = self.recipes[self.options.variant]
        self.widths: dict[float, float] = {}
        self.grad_clip = self.recipe.clip

    # --- the index policy (what the three methods differ in) ----------------------------
    def indices(self, width: float, rnd: int, client: int, gen: torch.Generator) -> Mapping[str, Sequence[int]]:
        """Global channel indices per group of a width-``width`` client (default: first-k)."""
        return first_k(self.ctx.model.full_widths, width, self.recipe.rounding)

    def global_indices(self, width: float) -> Mapping[str, Sequence[int]]:
        """The channels of a global model narrower than the full one (``eval_width`` "largest"): first-k, HeteroFL's
        nested levels (a method whose policy chooses otherwise, deterministically, overrides this)."""
        return first_k(self.ctx.model.full_widths, width, self.recipe.rounding)

    def index_bytes(self, indices: Mapping[str, Sequence[int]]) -> int:
        """Index overhead sent down with the plan (0: the server keeps or derives the indices)."""
        return 0

    # --- configuration ------------------------------------------------------------------
    def width_plan(self, width: float, indices: Mapping[str, Sequence[int]] | None = None) -> Plan:
        """The plan of a width-``width`` client (first-k indices unless given; all plans of
        one width share a shape, hence their measured memory). The Scaler rate is relative to the
        global width once ``setup`` knows it (while fitting, to 1: the same memory, or more)."""
        if indices is None:
            indices = first_k(self.ctx.model.full_widths, width, self.recipe.rounding)
        rate = width / (self.global_width() if self.widths else 1.0) if self.recipe.scaler else 1.0
        return Plan.of(indices, rate=rate, label=f"w={width:.4g}", index_bytes=self.index_bytes(indices))

    def fit_width(self, budget: float) -> float:
        """The largest grid width whose measured memory fits ``budget`` (a fraction of FedAvg's full model, which the
        full width exceeds where the method's step costs more)."""
        memory = self.ctx.profiler.memory_of
        best = fit_largest(WIDTHS, lambda w: memory(self.width_plan(w)), budget * self.ctx.full_memory)
        if best is None:
            raise too_small(budget, memory(self.width_plan(WIDTHS[0])), self.ctx.full_memory,
                            f"(width {WIDTHS[0]:g})")
        return best

    def setup(self) -> None:
        self.widths = {b: self.fit_width(b) for b in self.budgets}

    def plan(self, rnd: int, client: int, budget: float, gen: torch.Generator) -> Plan:
        width = self.widths[budget]
        return self.width_plan(width, self.indices(width, rnd, client, gen) if width < 1 else None)

    def schedule(self) -> list[tuple[dict, Plan]]:
        return [({"budget": b, "note": self.policy}, self.width_plan(w)) for b, w in self.widths.items()]

    # --- local training -----------------------------------------------------------------
    def client_inputs(self, data: ClientData) -> dict[str, torch.Tensor]:
        if not self.recipe.masked_loss:
            return {}
        return {"keep": label_mask(self.ctx.client_labels[data.client], self.dataset.num_classes, self.ctx.device)}

    def loss(self, model: FedModel, x: torch.Tensor, y: torch.Tensor, plan: Plan, step: Step,
             keep: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy; HeteroFL masks the logits of classes the client does not hold (``keep``)."""
        logits = model(x, blocks=step.blocks)
        if keep is not None:
            logits = logits.masked_fill(~keep, 0.0)
        return F.cross_entropy(logits, y)

    # --- aggregation and evaluation -----------------------------------------------------
    def add_update(self, agg: MaskedMean, plan: Plan, model: FedModel, data: ClientData) -> None:
        update = uploaded(model, plan)
        masks = None
        if self.recipe.label_rows:
            rows = label_mask(self.ctx.client_labels[data.client], self.dataset.num_classes, self.ctx.device)
            masks = {name: rows.view(-1, *[1] * (update[name].dim() - 1)).expand_as(update[name])
                     for name in classifier(model) if name in update}
        agg.add(plan, update, self.client_weight(data), masks)

    def global_width(self) -> float:
        """The width of the global model, which is evaluated: 1, or the largest client width of the run."""
        return max(self.widths.values()) if self.recipe.eval_width == "largest" else 1.0

    def eval_model(self, global_model: FedModel, rnd: int) -> FedModel:
        model, width = global_model, self.global_width()
        if width < 1:
            model = extract(self.ctx.build, global_model, self.width_plan(width, self.global_indices(width)))
        return static_bn(model, self.dataset, self.sbn_samples()) if self.recipe.sbn else model

    def sbn_samples(self) -> int:
        """Training images in the sBN pass (0: all); only recipes with ``sbn`` run one."""
        return 0

    def describe_eval(self) -> str:
        g = self.global_width()
        width = "full-width" if g >= 1 else f"largest client width (w={g:.4g})"
        n = self.sbn_samples()
        over = f"its first {n} images" if n and n < len(self.dataset.train_y) else "the training set"
        stats = (f", BN layers (if any) with sBN statistics from one pass over {over}" if self.recipe.sbn
                 else ", BN layers (if any) with test-batch statistics")
        return f"top-1 accuracy of the {width} global model on the test split{stats}"
