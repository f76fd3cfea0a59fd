"""DepthFL (Kim, Yu, Kim, Moon, ICLR 2023, "DepthFL: Depthwise Federated Learning for Heterogeneous Clients",
openreview pf8RIZTMU58). Checked against the first author's Flower baseline ``adap/flower`` ``baselines/depthfl``
(``resnet.py``, ``models.py``, ``strategy.py``, ``client.py``), read, not copied.

**Global model.** The run's model cut into *levels* with a classifier (exit) after each (the paper: local
models of different depths are made by pruning the deepest layers; each depth ends in its own classifier).
A level is a stage: it ends at a block whose output shape differs from the next block's (the paper and the
code split ResNet-18 at its 4 stages). ResNet-20 on fmnist-mini: 3 levels, blocks 0-2 (16 ch, 28x28),
3-5 (32 ch, 14x14), 6-8 (64 ch, 7x7). The deepest level's exit is the model's own head (pool + linear, the
code's ``fc``); every shallower level's exit is the code's design scaled to the model: an attention mask
(``attention{k}``: SepConv stride 2 -> BN -> ReLU -> bilinear upsample back to the level's size -> sigmoid,
multiplied into the features), a bottleneck of one SepConv per deeper level that brings the features to that
level's channels and resolution (``scala{k}``; SepConv = depthwise 3x3 (stride) -> 1x1 -> BN -> ReLU ->
depthwise 3x3 -> 1x1 -> BN -> ReLU), global average pool and a linear classifier (``middle_fc{k}``). For
ResNet-20: exit 1 = attention(16) + SepConv 16->32 + SepConv 32->64 + linear 64; exit 2 = attention(32) +
SepConv 32->64 + linear 64. Exit convs are Kaiming-normal (fan-out), as the code initialises convs; BN keeps
no running statistics, as the project's models. A shallow exit lives inside the last block of its level
(``blocks.{i}.exit``; that block's own layers are ``blocks.{i}.body``), so pruning the deeper blocks prunes
their exits: a depth-d client neither holds, receives nor sends anything of a deeper level.

**Depth by measurement** (``setup``). Depth-d plan: stem, blocks of levels 1..d and their d exits, all
trained (the final head too when d is the full depth). A client's depth is the deepest d whose measured
peak (the profiler, this method's own step: d exits, CE + self-distillation) fits ``budget x full-model
memory``, the full model's being FedAvg's (the plain ResNet-20, as for every method; ``engine.fedavg_memory``).
A budget below depth 1's measured memory is refused (``fedbench.budget.Infeasible``) with that floor. The paper assigns depths by equal client groups
(25% each of depths 1-4); here each ``--memory-budget`` group gets the deepest depth its budget affords.
On ResNet-20 activations dominate and the first stage holds most of them: measured at batch 32 on 1x28x28
images, depth 1 needs 0.627 of the full model's memory and depth 2 0.886, so budgets below 0.627 are refused
(``fedbench profile --method depthfl`` lists the floor). The exits cost memory too: the full DepthFL model
measures 1.38x FedAvg's ResNet-20 (57 vs 41 MB; exit 1 works at full resolution), though they add only 5% of
the parameters (13.8k of 286k).

**Local objective** (the paper's self-distillation loss; code ``models.train`` with ``extended`` and ``kd``): the
client's d exits give logits z_1..z_d; loss = sum_i [ CE(z_i, y) + w / (d-1) * sum_{j != i}
T^2 KL(softmax(z_j / T) || softmax(z_i / T)) ], the teacher z_j detached (mutual self-distillation, as the
code). w = 1, T = 1 (``--exit-distill-weight``, ``--exit-distill-temperature``; ``--exit-distill false`` is the
paper's "DepthFL w/o self-distillation"). A depth-1 client has no KL term.

**Aggregation**: the engine's masked mean: each tensor (backbone layer or exit) becomes the mean over the
round's clients that hold it; tensors no client held keep their value. Uniform client weights, as the code's
``aggregate`` (a count of clients per tensor); ``--weighting samples`` weights by sample count.

**Evaluation**: the paper's global-model accuracy (Table 2; Table 4 "Ensemble"): the ensemble of the global
model's exits, the mean of their logits (code ``models.test``), top-1 on the test split. When no budget of
the run reaches some levels, the ensemble is over the levels some client trains (the deeper exits would
vote at their initial weights; summary.json notes and warns).

Deviations:
1. FedDyn is not reproduced: the paper's headline "DepthFL" runs FedDyn (alpha 0.1) under the local
   objective; this is the paper's "DepthFL (FedAvg)" aggregation with self-distillation (dynamic
   regularisation would need per-client state and a server-side h).
2. The Flower code ramps the distillation weight up over the first 300 rounds (exp(-5 (1 - r/300)^2), from
   mean-teacher training); here the weight is constant, as in the paper's objective (a ramp would make the
   client's objective depend on the round, which its plan would have to carry).
3. Exits scaled to the model and generalised: SepConv strides follow the measured resolutions (the code
   hard-codes stride 2 per stage) and the attention upsamples to the level's own size (the code's x2 fails
   on odd sizes); BN without running statistics, as every fedbench model (the code: BN with running
   statistics, or GroupNorm).
4. The deepest exit (the model's head) is held and received, not run, trained or sent, by shallower clients
   (the engine prunes blocks only): a few KB of download (650 parameters on ResNet-20).
5. Optimiser, learning rate, its decay (code: 0.998 per round, weight decay 1e-3, no momentum) and batch
   size are the run's settings, as for every method.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.budget import fit_largest, too_small
from fedbench.errors import ConfigError
from fedbench.method import Method, register_method
from fedbench.methods.fedepth import kl
from fedbench.models import FedModel
from fedbench.models.base import Dim
from fedbench.plan import Plan, Step
from fedbench.settings import Range

DEPTH = "depth"  # plan option: the client's number of levels


@dataclass(frozen=True)
class Options:
    exit_distill: Annotated[bool, "mutual self-distillation among a client's exits (the paper's KL terms)"] = True
    exit_distill_weight: Annotated[float, Range(ge=0, le=1000), "weight of the exits' KL terms (paper: 1)"] = 1.0
    exit_distill_temperature: Annotated[float, Range(gt=0, le=100),
                                        "softmax temperature of the exits' KL terms, T^2-scaled (paper: 1)"] = 1.0


# ----------------------------------------------------------------------------- the exits

def norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


class SepConv(nn.Sequential):
    """Depthwise 3x3 (stride) -> 1x1 -> BN -> ReLU -> depthwise 3x3 -> 1x1 to ``c_out`` -> BN -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
            norm(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
            norm(c_out), nn.ReLU())


class Exit(nn.Module):
    """A shallow level's classifier: attention mask, SepConv bottleneck to the deepest level's scale, pool, linear.

    ``deeper``: (channels, stride) of each deeper level with a feature map. A level whose output is a vector
    gets the linear classifier alone.
    """

    def __init__(self, shape: Sequence[int], deeper: Sequence[tuple[int, int]], classes: int):
        super().__init__()
        channels = shape[0]
        self.spatial = len(shape) == 3
        if self.spatial:
            self.attention = nn.Sequential(SepConv(channels, channels, 2), norm(channels), nn.ReLU())
            layers, c = [], channels
            for c_next, stride in deeper:
                layers.append(SepConv(c, c_next, stride))
                c = c_next
            self.bottleneck = nn.Sequential(*layers)
            channels = c
        self.linear = nn.Linear(channels, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            mask = F.interpolate(self.attention(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = self.bottleneck(torch.sigmoid(mask) * x).mean((2, 3))
        return self.linear(x)


class ExitBlock(nn.Module):
    """The last block of a shallow level: runs ``body``; holds the level's ``exit`` (called by the method)."""

    def __init__(self, body: nn.Module, exit: Exit):
        super().__init__()
        self.body, self.exit = body, exit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def sample_shape(build: Callable[..., FedModel]) -> tuple[int, int, int]:
    """The input shape the engine's model factory builds for (its ``in_chans`` / ``img_size`` keywords)."""
    kw = getattr(build, "keywords", {})
    size = kw.get("img_size", 32)
    return kw.get("in_chans", 3), size, size


def level_layout(model: FedModel, shape: Sequence[int]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Blocks of each level (a level ends where the next block's output shape differs) and each block's output
    shape, from a forward pass of a meta-device copy."""
    x = torch.empty((2, *shape), device="meta")
    with torch.no_grad():
        x = model.stem(x)
        shapes = []
        for block in model.blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
    levels, current = [], []
    for i, s in enumerate(shapes):
        current.append(i)
        if i == len(shapes) - 1 or shapes[i + 1] != s:
            levels.append(tuple(current))
            current = []
    return levels, shapes


class DepthFLModel(FedModel):
    """The model's stem, blocks and head with an exit after each shallow level; ``forward``: the exits' ensemble."""

    def __init__(self, backbone: FedModel, levels: list[tuple[int, ...]], shapes: list[tuple[int, ...]]):
        super().__init__(backbone.full_widths, backbone.widths)
        classes = [m for m in backbone.head.modules() if isinstance(m, nn.Linear)][-1].out_features
        ends = [lv[-1] for lv in levels[:-1]]
        blocks = list(backbone.blocks)
        channels_last = any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                            and not p.is_contiguous() for p in backbone.parameters())
        for k, end in enumerate(ends):
            s = shapes[end]
            deeper, res = [], s[1] if len(s) == 3 else 0
            for lv in levels[k + 1:]:
                t = shapes[lv[-1]]
                if len(t) == 3:
                    deeper.append((t[0], max(1, round(res / t[1]))))
                    res = t[1]
            exit = Exit(s, deeper, classes)
            if channels_last:
                exit = exit.to(memory_format=torch.channels_last)
            blocks[end] = ExitBlock(blocks[end], exit)
        self.stem, self.blocks, self.head = backbone.stem, nn.ModuleList(blocks), backbone.head
        self.levels = levels
        renamed = {f"blocks.{i}.": f"blocks.{i}.body." for i in ends}

        def rename(name: str) -> str:
            prefix = ".".join(name.split(".")[:2]) + "."
            return renamed[prefix] + name[len(prefix):] if prefix in renamed else name
        self._dims: dict[str, tuple[Dim, ...]] = {rename(n): d for n, d in backbone.param_dims().items()}
        self._ties = backbone.tied_groups()

    @classmethod
    def build(cls, build: Callable[..., FedModel], **kw) -> "DepthFLModel":
        with torch.device("meta"):
            levels, shapes = level_layout(build(**kw), sample_shape(build))
        return cls(build(**kw), levels, shapes)

    def param_dims(self):
        return self._dims

    def tied_groups(self):
        return self._ties

    def level_prefixes(self, depth: int) -> tuple[str, ...]:
        """Parameter prefixes of the stem, levels 1..depth and their exits (the head for the full depth)."""
        blocks = tuple(f"blocks.{i}" for lv in self.levels[:depth] for i in lv)
        return ("stem", *blocks) + (("head",) if depth == len(self.levels) else ())

    def exit_logits(self, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Logits of exits 1..depth in one forward pass through levels 1..depth."""
        x = self.stem(x)
        out = []
        for k, level in enumerate(self.levels[:depth]):
            for i in level:
                x = self.blocks[i](x)
            out.append(self.head(x) if k == len(self.levels) - 1 else self.blocks[level[-1]].exit(x))
        return out

    def ensemble(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        return torch.stack(self.exit_logits(x, depth or len(self.levels))).mean(0)

    def forward(self, x: torch.Tensor, blocks: Sequence[int] | None = None) -> torch.Tensor:
        """The mean logits of the exits of every level whose blocks run (all by default)."""
        held = None if blocks is None else set(blocks)
        depth = sum(1 for lv in self.levels if held is None or set(lv) <= held)
        return self.ensemble(x, depth)


class Ensemble(nn.Module):
    """The global model's exits 1..depth averaged (evaluation when no budget reaches the deeper levels)."""

    def __init__(self, model: DepthFLModel, depth: int):
        super().__init__()
        self.model, self.depth = model, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.ensemble(x, self.depth)


# ----------------------------------------------------------------------------- the method

@register_method
class DepthFL(Method):
    name = "depthfl"
    description = ("depth-scaled local models (stage prefixes, depth fitted to the budget by measurement) with "
                   "an exit per stage and mutual self-distillation; ensemble of exits at inference")
    paper = ("Kim, Yu, Kim, Moon 2023, DepthFL: Depthwise Federated Learning for Heterogeneous Clients "
             "(ICLR 2023)")
    budgeted = True
    weighting = "uniform"  # the code's aggregate counts clients per tensor
    preferred_model = "resnet20"
    Options = Options

    @classmethod
    def build_global(cls, build):
        return DepthFLModel.build(build)

    @classmethod
    def client_builder(cls, build):
        return lambda **kw: DepthFLModel.build(build, **kw)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.levels: list[tuple[int, ...]] = ctx.model.levels
        self.depths: dict[float, int] = {}

    # --- configurations -------------------------------------------------------------------
    def depth_plan(self, depth: int) -> Plan:
        model: DepthFLModel = self.ctx.model
        blocks = tuple(i for lv in self.levels[:depth] for i in lv)
        step = Step(blocks=blocks, trainable=model.level_prefixes(depth))
        return Plan(steps=(step,), label=f"depth {depth}/{len(self.levels)}", options=((DEPTH, depth),))

    def full_plan(self) -> Plan:
        return self.depth_plan(len(self.levels))

    def memory(self, depth: int) -> int:
        return self.ctx.profiler.memory_of(self.depth_plan(depth))

    def setup(self) -> None:
        if len(self.levels) < 2:
            raise ConfigError("--model", f"DepthFL needs a model whose blocks form at least 2 stages (a block that "
                                         f"changes the feature shape); {self.config.model} has one; allowed: "
                                         f"resnet20, preresnet20, fedavg-cnn")
        full, depths = self.ctx.full_memory, list(range(1, len(self.levels) + 1))
        self.depths = {}
        for b in self.budgets:
            depth = fit_largest(depths, self.memory, b * full)
            if depth is None:
                first = self.levels[0]
                raise too_small(b, self.memory(1), full, f"(depth 1: stem, blocks {first[0]}-{first[-1]} and exit 1)")
            self.depths[b] = depth

    def plan(self, rnd, client, budget, gen) -> Plan:
        return self.depth_plan(self.depths[budget])

    def schedule(self):
        full = self.ctx.full_memory
        rows = []
        for b, d in self.depths.items():
            blocks = self.depth_plan(d).steps[0].blocks
            exits = "exit 1" if d == 1 else f"exits 1-{d}"
            note = (f"blocks {blocks[0]}-{blocks[-1]}, {exits}; depth memory/full: "
                    + " ".join(f"{self.memory(k) / full:.3f}" for k in range(1, len(self.levels) + 1)))
            rows.append(({"budget": b, "note": note}, self.depth_plan(d)))
        return rows

    # --- local objective ------------------------------------------------------------------
    def loss(self, model, x, y, plan, step):
        logits = model.exit_logits(x, plan.option(DEPTH))
        loss = sum(F.cross_entropy(z, y) for z in logits)
        o, n = self.options, len(logits)
        if o.exit_distill and n > 1 and o.exit_distill_weight > 0:
            kd = sum(kl(z_i, z_j, o.exit_distill_temperature)
                     for i, z_i in enumerate(logits) for j, z_j in enumerate(logits) if j != i)
            loss = loss + o.exit_distill_weight / (n - 1) * kd
        return loss

    # --- evaluation -----------------------------------------------------------------------
    def trained_depth(self) -> int:
        """The deepest level some budget of the run trains (all levels when the depths are not resolved yet)."""
        return max(self.depths.values(), default=len(self.levels))

    def eval_model(self, global_model, rnd):
        depth = self.trained_depth()
        return global_model if depth == len(self.levels) else Ensemble(global_model, depth)

    def describe_eval(self) -> str:
        depth, n = self.trained_depth(), len(self.levels)
        which = "all exits" if depth == n else f"exits 1-{depth} of {n} (no budget reaches deeper levels)"
        return f"top-1 accuracy of the ensemble (mean logits) of {which} of the global model on the test split"

    def notes(self, rounds: int) -> dict:
        return {"depths": {f"{b:g}": d for b, d in self.depths.items()},
                "untrained_levels": list(range(self.trained_depth() + 1, len(self.levels) + 1))}

    def warnings(self, rounds: int) -> list[str]:
        depth, n = self.trained_depth(), len(self.levels)
        if depth == n:
            return []
        return [f"levels {depth + 1}-{n} are trained by no client at these budgets; evaluated: the ensemble of "
                f"exits 1-{depth}"]
