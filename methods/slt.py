"""SLT: Successive Layer Training (Pfeiffer, Khalili, Henkel, NeurIPS 2023, arXiv 2305.17005),
methods-width-slt.md §5.

**Configuration (s, K_T)** (§5.1-5.2). The K layers are the model's ``layer_groups()`` (a conv
or linear with its norm; a projection shortcut belongs to the stream it feeds, so it is not
counted: K = 19 for ResNet-20, 3 for the CNN). Layers 1..K_T-1 are frozen at full width,
layer K_T is trained at full width, layers K_T+1..K form a first-k head of width s (floor
rounding, at least one channel, as the code); the first head layer takes full-width input and
the identity shortcut at that boundary keeps the first channels (``resnet.BasicBlock``). The
classifier keeps every class and is always trained. K_T = 0 is the pre-training configuration:
every layer at width s1, all trained (the width-s1 small model). The frozen layers form a prefix
without trainable parameters, so they run without autograd and store no activations.

**Sequence** (§5.3, the code's generator). From the deepest step K_T = K-1 down to K_T = 1,
carrying s over from s = 1, s is lowered by 0.001 until the configuration fits the smallest
client budget; the list is reversed and cut after the first s = 1. "Fits" asks the profiler
(``--slt-memory-model measured``, default: measured peak <= budget x full-model peak), or SLT's
own estimator (``paper``: batch 32, fp32, output sizes of the ops that backward reaches + every
parameter + trainable gradients, no optimizer state, at least the largest single activation;
the budget b is that estimate for the width-b small model, profiling.md §4.1; both compared in
GB rounded to 4 decimals, as the code does), which reproduces the paper's sequence.

**Schedule** (§5.4). Pre-training for int(s1 R) rounds, then configuration i for a share of the
remaining rounds proportional to its trainable bytes (cumulative, normalised); the last one
runs to the end. All clients of a round share the configuration; a client whose budget is
larger than the smallest trains the largest number of trailing full-width layers (training
depth d, ending at K_T) that fits its own budget (§5.4.3). A plan is a function of the round
and the client's budget only.

**Communication, aggregation, evaluation** (§5.5). Down: the whole configuration sub-model
(frozen layers re-sent to stateless clients); up: trained tensors only. Masked averaging at the
first-k indices (frozen tensors are not sent back, so they keep their value). Evaluated: the
global model restricted to the current configuration, which is the full model once s = 1.

Deviations: (1) training depth counts layers, where the code counts every tensor whose name
contains "conv" (a shortcut conv counts as a layer there), and the depth table is measured at
setup for the run's budgets (the code ships it as JSON, for ResNet-44 and DenseNet-40 only),
starting from the deepest configuration used rather than from step K-1; (2) a
budget for which some step fits at no head width is refused (``fedbench.budget.too_small``, an
``Infeasible`` ConfigError; the code raises ValueError), reporting the true floor.

**Floor** (``floor()``). A sequence exists iff every step K_T = 1..K-1 fits at its narrowest head
(memory does not decrease with s), so the smallest budget that SLT accepts is the maximum over
all steps of that memory, not the need of the first failing step of the deepest-first scan.
Measured memory, unlike the paper's estimator, counts the transient activations of the frozen
full-width forward pass and the optimizer state, so a step costs more than the paper estimates.
Measured at batch 32 (``fedbench profile --method slt --memory-budget 0.1 ...`` refuses and
reports it): ResNet-20 on CIFAR-10 shapes (3x32x32, ``--dataset cifar10``) 0.246, on fmnist-mini
(1x28x28) 0.238, both set by K_T = 7 with K_T = 3 and 5 within 0.001 (the second conv of a
first-stage block trained at full width; the deepest step, K_T = 18, needs 0.186 / 0.185), so a
0.125 or 0.2 budget fits no sequence; the 3-layer cnn on fmnist-mini 0.323 (K_T = 1). Under the
paper's estimator (``--slt-memory-model paper``), whose budgets are small-model widths, the floor
of ``resnet20-slt`` on CIFAR-10 shapes is 0.125 (K_T = 3).
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch.overrides import TorchFunctionMode

from fedbench.budget import fit_largest, too_small
from fedbench.errors import ConfigError
from fedbench.method import Method, register_method
from fedbench.models import FedModel, scaled
from fedbench.plan import Plan, Step
from fedbench.submodel import build_submodel, extract, set_trainable
from fedbench.methods._width import first_k

PAPER_BATCH = 32  # SLT's estimator input (memory/memory_configs_slt.py)
S_STEP = 1000     # s is lowered in steps of 1/1000 (§5.3)


@dataclass(frozen=True)
class Options:
    slt_memory_model: Annotated[Literal["measured", "paper"], "configurations fitted by measured peak, or by the paper's estimator"] = "measured"


class _OpOutputs(TorchFunctionMode):
    """Bytes (fp32) of the op outputs in the back-propagated part of a forward, and the largest one."""

    def __init__(self):
        super().__init__()
        self.backward = self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            size = out.numel() * 4
            self.largest = max(self.largest, size)
            self.backward += size if out.requires_grad else 0
        return out


def paper_memory(model: FedModel, sample_shape: Sequence[int]) -> int:
    """SLT's ``training_mem`` (§5.3) of a client model whose frozen parameters are already set.

    The code sums the output-gradient sizes of the leaf modules reached by backward; here, the
    outputs of the torch functions that require grad (conv, norm, ReLU, shortcut slice, add,
    pool, flatten, linear: one per leaf module of the code's ResNet). Runs on the meta device.
    """
    x = torch.empty((PAPER_BATCH, *sample_shape), device="meta")
    with _OpOutputs() as ops:
        model(x)
    params = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    grads = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return max(ops.backward + 4 * (params + grads), ops.largest)


def round_bounds(s1: float, trainable_bytes: Sequence[int], rounds: int) -> list[int]:
    """§5.4: [R0, b_1, ..., b_N]; configuration i (0 = pre-training) runs rounds [b_{i-1}, b_i)."""
    top = max(trainable_bytes)
    cum = list(itertools.accumulate(p / top for p in trainable_bytes))
    r0 = int(s1 * rounds)
    return [r0] + [r0 + int(c / cum[-1] * (rounds - r0)) for c in cum]


@register_method
class SLT(Method):
    name = "slt"
    description = ("successive layer training: frozen full-width prefix, one full-width trained layer, "
                   "width-s head; the (s, K_T) sequence is fitted to the smallest budget")
    paper = ("Pfeiffer et al. 2023, Aggregating Capacity in FL through Successive Layer Training for "
             "Computationally-Constrained Devices (arXiv 2305.17005)")
    budgeted = True
    weighting = "uniform"  # the SLT code averages clients without weights (methods-width-slt.md §5.7)
    trains_batched = True
    Options = Options

    # --- configurations -------------------------------------------------------------------
    def setup(self) -> None:
        self.layers = self.ctx.model.layer_groups()
        if len(self.layers) < 2:
            raise ConfigError("--model", f"SLT needs a model of at least 2 layers; {self.config.model} "
                              f"declares {len(self.layers)}")
        self._plans: dict[tuple, Plan] = {}
        self._paper: dict[tuple, int] = {}
        self.low = self.budgets[0]
        self.sequence = self.fit_sequence(self.low)
        self.configs = [(self.sequence[0][0], 0), *self.sequence]
        sizes = [self.ctx.profiler.bytes_of(self.config_plan(s, k))[1] for s, k in self.sequence]
        self.bounds = round_bounds(self.sequence[0][0], sizes, self.config.rounds)
        self.depths = {b: self.fit_depths(b) for b in self.budgets if b > self.low}  # the lowest: depth 1

    def config_plan(self, s: float, k_t: int, depth: int = 1) -> Plan:
        """Layers before K_T at full width (all but the last ``depth`` of them up to K_T frozen), a width-s head."""
        key = (s, k_t, depth)
        if key not in self._plans:
            full = self.ctx.model.full_widths
            head = first_k({g: full[g] for g, _ in self.layers[k_t:]}, s, "floor")
            if k_t == 0:
                self._plans[key] = Plan.of(head, label=f"pre s={s:g}")
            else:
                frozen = {n for _, names in self.layers[:k_t - depth] for n in names}
                trainable = tuple(n for n, _ in self.ctx.model.named_parameters() if n not in frozen)
                label = f"s={s:g} K_T={k_t}" + (f" d={depth}" if depth > 1 else "")
                self._plans[key] = Plan.of(head, steps=(Step(trainable=trainable),), label=label)
        return self._plans[key]

    def estimate(self, plan: Plan) -> int:
        """Bytes by the chosen memory model."""
        if self.options.slt_memory_model == "measured":
            return self.ctx.profiler.memory_of(plan)
        key = plan.shape_key()
        if key not in self._paper:
            with torch.device("meta"):
                model = build_submodel(self.ctx.build, self.ctx.model, plan)
            set_trainable(model, plan.steps[0])
            self._paper[key] = paper_memory(model, self.dataset.train_x.shape[1:])
        return self._paper[key]

    def limit(self, fraction: float) -> int:
        """A budget in bytes: of the measured full model, or the paper's width-b small model."""
        if self.options.slt_memory_model == "measured":
            return int(fraction * self.ctx.full_memory)
        return self.estimate(Plan.of(first_k(self.ctx.model.full_widths, min(fraction, 1.0), "floor")))

    def units(self, nbytes: int) -> float:
        """What "fits" compares: bytes, or GB rounded to 4 decimals as the paper's code does."""
        return round(nbytes / 1e9, 4) if self.options.slt_memory_model == "paper" else nbytes

    def fits(self, plan: Plan, limit: int) -> bool:
        return self.units(self.estimate(plan)) <= self.units(limit)

    def fit_sequence(self, fraction: float) -> list[tuple[float, int]]:
        """§5.3: the (s, K_T) list for one budget, K_T ascending, ending at the first s = 1.

        The code lowers s by 0.001 until the configuration fits, so it stops at the largest s of
        the widest fitting head shape; memory does not decrease with s, so a binary search over
        those candidates finds the same value with few measurements.
        """
        limit, m, found = self.limit(fraction), S_STEP, []
        for k_t in range(len(self.layers) - 1, 0, -1):
            if not self.fits(self.config_plan(m / S_STEP, k_t), limit):
                def cost(c: int) -> float:
                    return self.units(self.estimate(self.config_plan(c / S_STEP, k_t)))
                m = fit_largest(self.candidates(m), cost, self.units(limit))
                if m is None:
                    raise self.refusal(fraction)
            found.append((m / S_STEP, k_t))
        sequence = []
        for s, k_t in reversed(found):
            sequence.append((s, k_t))
            if s == 1.0:
                break
        return sequence

    def candidates(self, below: int) -> list[int]:
        """Per distinct set of floor widths reached with s < below/1000, its largest s (in 1/1000)."""
        full = self.ctx.model.full_widths.values()
        top = {tuple(scaled(c, m / S_STEP, "floor") for c in full): m for m in range(1, below)}
        return sorted(top.values())

    def narrowest_needs(self) -> dict[int, int]:
        """Per step K_T = 1..K-1, the bytes (chosen memory model) of its configuration at the narrowest head."""
        return {k_t: self.estimate(self.config_plan(1 / S_STEP, k_t)) for k_t in range(1, len(self.layers))}

    def floor(self) -> tuple[float, int]:
        """The smallest budget for which ``fit_sequence`` succeeds, and the step K_T that sets it.

        A sequence exists iff every step fits at its narrowest head (memory does not decrease with s),
        so the floor is the maximum over all steps of their narrowest configuration's memory, not the
        need of the first step the deepest-first scan finds failing. Measured model: that maximum as
        a fraction of the full model's measured training memory. Paper model: the smallest width b
        (on the 1/1000 grid of s) whose small-model estimate, the budget's limit, covers it.
        """
        needs = self.narrowest_needs()
        k_t = max(needs, key=lambda k: (needs[k], -k))
        if self.options.slt_memory_model == "measured":
            return needs[k_t] / self.ctx.full_memory, k_t
        grid = range(1, S_STEP + 1)
        i = bisect.bisect_left(grid, self.units(needs[k_t]), key=lambda m: self.units(self.limit(m / S_STEP)))
        return (grid[i] / S_STEP if i < len(grid) else float("inf")), k_t

    def refusal(self, fraction: float) -> ConfigError:
        """The error for a budget below ``floor()``: the true floor over all steps, by ``budget.too_small``."""
        floor, k_t = self.floor()
        mode, model = self.options.slt_memory_model, self.config.model
        if floor == float("inf"):  # paper model: not even the full-width small model's estimate covers it
            return ConfigError("--memory-budget", f"{fraction:g} is too small for SLT on {model}: configuration "
                                                  f"K_T={k_t} exceeds the paper estimate of the full model")
        full = self.ctx.full_memory
        if mode == "measured":
            smallest, how = self.estimate(self.config_plan(1 / S_STEP, k_t)), "measured"
        else:  # a budget b is the width of the small model whose paper estimate bounds the configuration
            smallest, how = math.ceil(floor * full), "paper estimate; a budget is a small-model width"
        return too_small(fraction, smallest, full,
                         f"of SLT on {model} (K_T={k_t} with the narrowest head, the costliest step; {how})")

    def fit_depths(self, fraction: float) -> list[int]:
        """§5.4.3: per configuration, the most trailing full-width layers (<= K_T) that fit ``fraction``.

        As the code, the depth is carried from deeper to shallower configurations (it never grows).
        """
        limit, d, depths = self.limit(fraction), len(self.layers), []
        for s, k_t in reversed(self.sequence):
            d = min(d, k_t)
            while d > 1 and not self.fits(self.config_plan(s, k_t, d), limit):
                d -= 1
            depths.append(d)
        return depths[::-1]

    # --- rounds ---------------------------------------------------------------------------
    def phase(self, rnd: int) -> int:
        """Index into ``configs`` of round ``rnd`` (0 = pre-training)."""
        return min(bisect.bisect_right(self.bounds, rnd), len(self.configs) - 1)

    def plan(self, rnd: int, client: int, budget: float, gen: torch.Generator) -> Plan:
        i = self.phase(rnd)
        depth = self.depths[budget][i - 1] if i > 0 and budget > self.low else 1
        return self.config_plan(*self.configs[i], depth)

    def schedule(self) -> list[tuple[dict, Plan]]:
        """Pre-training and every configuration with its rounds (0-based, as the §5.4 table); then,
        per larger budget, the configurations where its clients train more than one full-width layer."""
        edges = [0, *self.bounds]
        paper = self.options.slt_memory_model == "paper"
        limit = self.limit(self.low) if paper else 0
        rows = []
        for i, (s, k_t) in enumerate(self.configs):
            span = f"rounds {edges[i]}-{edges[i + 1] - 1}" if edges[i + 1] > edges[i] else "no rounds"
            plan = self.config_plan(s, k_t)
            note = span + (f"; paper estimate {self.estimate(plan) / limit:.2f} of budget" if paper else "")
            rows.append(({"budget": self.low, "note": note}, plan))
            for b, depths in self.depths.items():
                if i > 0 and depths[i - 1] > 1:
                    rows.append(({"budget": b, "note": f"{span}; budget-{b:g} clients"},
                                 self.config_plan(s, k_t, depths[i - 1])))
        return rows

    # --- evaluation -----------------------------------------------------------------------
    def eval_model(self, global_model: FedModel, rnd: int) -> FedModel:
        plan = self.config_plan(*self.configs[self.phase(rnd)])  # the configuration round ``rnd`` trained
        return extract(self.ctx.build, global_model, plan)

    def describe_eval(self) -> str:
        s = self.configs[-1][0]
        last = (f"the full model from round {self.bounds[-2] + 1} (s = 1)" if s == 1.0 else
                f"the last configuration keeps s = {s:g} < 1, so the full model is never evaluated")
        return ("top-1 accuracy of the global model restricted to the current SLT configuration "
                f"(frozen full-width layers + width-s head, §5.5) on the test split; {last}")
