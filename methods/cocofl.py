"""CoCoFL (Pfeiffer, Rapp, Khalili, Henkel, TMLR 2023, "CoCoFL: Communication- and Computation-Aware Federated
Learning via Partial NN Freezing and Quantization", openreview XJIg4kQbkv). Checked against the authors' code
``k1l1/CoCoFL`` (``algorithms/cocofl.py``, ``nets/QuantizedNets/ResNet/resnet.py``, ``.../utils/backwards.py``,
``.../utils/utils.py``), read, not copied.

**Units and configurations** (the code's ``QResNet``). The model's units in forward order are its stem, each
block and its head (ResNet-20: 11 units; the code's ResNet-18: input layer, 8 blocks, linear). A configuration
trains one *contiguous* run of units [a, b] (the code asserts "continous block of trained layers"); every other
unit is frozen and quantised:

- frozen units before a (the code's ``QFW*`` blocks) run forward only, without autograd: no activations are saved
  and no gradient is computed for them;
- frozen units after b (the code's ``QBW*`` blocks) must pass the loss's gradient back to the trained run: they
  compute the gradient with respect to their input, never their weights.

A plan has one step whose ``trainable`` prefixes are the units of [a, b] (the full model: every unit, FedAvg's
plan). Units without parameters are never a configuration of their own.

**Quantisation, and how the memory is counted.** When a client trains, its trainer (``CoCoFLTrainer``) replaces
every frozen unit by an int8 copy (``Int8Unit``): each weight of two or more dimensions (convolutions, linear
layers) is stored as a real ``torch.int8`` tensor with one float32 scale (symmetric per tensor, max|w| / 127);
1-D tensors (BatchNorm's affine, biases) stay float32, as the code keeps the fused bias float. Each frozen unit's
input is quantised the same way (the code quantises every frozen convolution's input to 8 bits). The arithmetic
is simulated: the unit runs in float on its dequantised weights and input (``torch.func.functional_call``), one
unit at a time. torch's int8 kernels (``torch.ops.quantized``, engines fbgemm/x86/onednn/qnnpack) are not used:
their quantised tensor types are deprecated in the torch this project pins, their prepacked weights are opaque
objects that the profiler cannot see, and they are not available or not alike on every CPU this benchmark runs
on; the simulation runs the same way on any device, CPU or CUDA. So the memory a client is measured at is
what an int8 device stores: the profiler's live-tensor peak of one real step of this trainer sees the int8
weights at 1 byte per element, the float32 1-D tensors and scales, the int8 inputs saved by the frozen units
after b, and, as transients, the dequantised float copy of the weights of the one frozen unit being run (the
input of a frozen unit before a is rounded to its 8-bit values in place; the float activations between units are
float32 where an int8 kernel would hold 8-bit ones, the price of the simulation).
The float32 frozen weights the simulation keeps in its working module (to load the next round's global values
in place) are not counted: a device quantises each frozen tensor as it arrives and keeps only the int8 copy.
Compute is not int8-accelerated here: the paper's time savings are not reproduced; FLOPs count what runs.
``--cocofl-quantize false`` keeps the frozen units float32 (freezing only; the paper's ablation of quantisation).

**Backward through frozen units after b.** The code folds BatchNorm into the convolution with its running
statistics (``fuse_conv_bn_weights``) and computes each frozen layer's input gradient with a quantised
transposed convolution (``qconv2d_function``), saving the float ReLU outputs for the ReLU's backward. fedbench's
models keep no running statistics (BN normalises with batch statistics), so BN cannot be folded into a constant
affine. Here a frozen unit after b is one autograd function (``FrozenThrough``) that saves only its int8-quantised
input and, in the backward pass, recomputes the unit from it (dequantised weights, batch-statistics BN) and
returns the gradient with respect to that input (straight-through for the input quantiser): the exact gradient of
what ran, for 1 byte per input element saved, at the cost of one more forward of the unit.

**Choosing a configuration by measurement** (``setup``; the code's ``filter_table`` + ``get_freezing_config``).
The code keeps the profiled configurations within the device's time, data and memory limits, drops every one
whose trained set is a strict subset of another kept one, and each round draws one of the rest uniformly
(``random.choice``). Here the only limit is memory, measured: for each budget, the maximal configurations are
found with the profiler's measured peak of each candidate (``profiler.memory_of``), a staircase search over
starts a (the widest [a, b] that fits for each a, assuming a run within another never measures more; every
chosen run is itself measured, so no client exceeds its budget), and each round a
client draws one of them with its round generator. A budget >= 1 trains the full model. A budget below every
single-unit configuration's measured memory is refused (``fedbench.budget.Infeasible``) with that floor. On
ResNet-20 / fmnist-mini at batch 32 the cheapest one, training the head alone, measures 0.159 of the full model
(3.5 of 22.3 MB: the float32 activations of the frozen forward through the first stage, which an int8 kernel
would hold at 8 bits), so 0.125 is refused; at 0.25 the maximal runs are b5, b6 or b7-head (0.20-0.24), at 0.5
the stem, b2-b3, b3-b6 or b4-head (0.41-0.47) (``fedbench profile --method cocofl`` lists them).

**Upload and aggregation** (``CoCoFLDevice.get_model_state_dict``, ``CoCoFLServer.model_averaging``). A client
sends the parameters it trained, float32 (``uploaded``: only trained tensors count as bytes up); it receives the
whole float32 model (stateless; the frozen units it quantises itself, so they count as sent down at float32).
The server's rule (the code cites the paper's Algorithm 2): for every tensor trained by r of the round's N
clients, new = (r/N) mean(trained values) + (1 - r/N) old, i.e. the mean over all N clients with each non-training
client counting the server's value; a tensor no client trained keeps its value. Implemented by adding every
client's frozen tensors at the values it received (equal to the server's) to the masked mean; uniform client
weights, as the code's ``torch.mean`` (``--weighting samples`` weights by size).

**Evaluation**: the full float32 global model, top-1 on the test split (the code's ``FedAvgEvaluationDevice``).

Deviations:
1. Simulated int8 (int8 storage, float arithmetic), not torch's quantised kernels (above); time is not measured.
2. BatchNorm with batch statistics is not folded; frozen units after b save their int8 input and recompute in the
   backward pass instead of saving float ReLU outputs and running transposed int8 convolutions (above): less
   memory, more FLOPs (forward, recompute and input gradient: about what training the unit costs, so training
   only the stem counts the full model's FLOPs; the code's transposed convolution saves a third). The
   code's calibrated per-layer output scales (``op_scale``, ``op_scale_bw``, averaged by the server) are not
   needed: outputs stay float.
3. Weights and inputs use the symmetric int8 scale max|t| / 127 per tensor (the code: 2 max|t| / 127, and an
   unsigned input with zero point 64).
4. Configurations are chosen by measured memory alone (the code: profiled tables of time, data and memory per
   device class); the data (upload) limit is not applied.
5. Units are the model's stem, blocks and head (ResNet-20 here, ResNet-18/50, MobileNet, DenseNet, Transformer
   in the code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedbench.budget import too_small
from fedbench.errors import ConfigError
from fedbench.method import Method, Trainer, register_method
from fedbench.models import FedModel
from fedbench.plan import Plan, Step

TRAINED = "trained"  # plan option: (a, b), the run of units a..b that trains


@dataclass(frozen=True)
class Options:
    cocofl_quantize: Annotated[bool, "store frozen layers as int8 (false: frozen layers stay float32, freezing only)"] \
        = True


# ----------------------------------------------------------------------------- int8 frozen units

def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8: (int8 values, float32 scale max|t| / 127). No ``.item()``: runs on meta."""
    t = t.detach()
    low, high = torch.aminmax(t)  # no full-size temporary (|t| would be one)
    scale = (torch.maximum(-low, high).float() / 127).clamp_min(1e-12)
    return (t / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(torch.float32).mul_(scale).to(dtype)


class Int8Unit(nn.Module):
    """A frozen unit as the client stores it: int8 weights (>= 2-D) and scales, float32 copies of 1-D tensors.

    ``run`` evaluates the original unit's structure on the dequantised weights (``functional_call``); the float32
    unit it was made from is held unregistered, for its structure only.
    """

    def __init__(self, unit: nn.Module, quantized: bool):
        super().__init__()
        self.structure = [unit]
        self.names: list[tuple[str, str, bool]] = []  # (parameter name, buffer stem, quantised)
        for i, (name, p) in enumerate(unit.named_parameters()):
            if quantized and p.dim() >= 2:
                q, s = quantize(p)
                self.register_buffer(f"q{i}", q)
                self.register_buffer(f"s{i}", s)
                self.names.append((name, str(i), True))
            else:
                self.register_buffer(f"f{i}", p.detach().clone())
                self.names.append((name, str(i), False))
        self.quantized = quantized

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: (dequantize(getattr(self, f"q{i}"), getattr(self, f"s{i}")) if q else getattr(self, f"f{i}"))
                for name, i, q in self.names}

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.structure[0], self.weights(), (x,))

    def input_of(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's input as the quantised path sees it (8-bit values), rounded in place (no copy): only for an
        input nothing else needs (the frozen prefix, without autograd)."""
        if self.quantized:
            low, high = torch.aminmax(x)
            scale = (torch.maximum(-low, high).float() / 127).clamp_min(1e-12).to(x.dtype)
            x.div_(scale).round_().clamp_(-127, 127).mul_(scale)
        return x


class FrozenThrough(torch.autograd.Function):
    """A frozen unit after the trained run: forward on the (quantised) input; saves only the int8 input; backward
    recomputes the unit from it and returns the gradient with respect to the input (never the weights)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, unit: Int8Unit) -> torch.Tensor:
        ctx.unit, ctx.dtype = unit, x.dtype
        if unit.quantized:
            q, s = quantize(x)
            ctx.save_for_backward(q, s)
            x = dequantize(q, s, x.dtype)
        else:
            ctx.save_for_backward(x)
        with torch.no_grad():
            return unit.run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        x = dequantize(*saved, ctx.dtype) if ctx.unit.quantized else saved[0].detach()
        with torch.enable_grad():
            x = x.requires_grad_()
            torch.autograd.backward(ctx.unit.run(x), grad, inputs=[x])  # not autograd.grad: FlopCounterMode's
        return x.grad, None                                              # module hooks refuse a nested grad()


def units(model: FedModel) -> list[tuple[str, nn.Module]]:
    """The model's units in forward order: (parameter prefix, module)."""
    return [("stem", model.stem), *((f"blocks.{i}", b) for i, b in enumerate(model.blocks)), ("head", model.head)]


class CoCoFLTrainer(Trainer):
    """SGD on the trained run [a, b]; frozen units before it run int8 without autograd, those after it int8
    through ``FrozenThrough``. Its modules are the trained units and the int8 copies (what the client stores)."""

    def __init__(self, method: "CoCoFL", model: FedModel, plan: Plan, step: Step, lr: float):
        super().__init__(method, model, plan, step, lr)
        a, b = plan.option(TRAINED, (0, len(units(model)) - 1))
        quantized = method.options.cocofl_quantize
        self.path: list[tuple[str, nn.Module]] = []
        for i, (_, unit) in enumerate(units(model)):
            kind = "train" if a <= i <= b else "forward" if i < a else "through"
            self.path.append((kind, unit if kind == "train" else Int8Unit(unit, quantized)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, unit in self.path:
            if kind == "train":
                x = unit(x)
            elif kind == "forward":
                with torch.no_grad():
                    x = unit.run(unit.input_of(x))
            else:
                x = FrozenThrough.apply(x, unit)
        return x

    def loss(self, x, y, gen):
        return F.cross_entropy(self.forward(self.prepare(x, gen)), y)

    def modules(self) -> list[nn.Module]:
        return [unit for _, unit in self.path]


# ----------------------------------------------------------------------------- the method

@register_method
class CoCoFL(Method):
    name = "cocofl"
    description = ("partial freezing and int8 quantisation: each client trains a contiguous run of units (stem, "
                   "blocks, head) fitted to its budget by measurement; frozen units stored int8, no weight gradients")
    paper = ("Pfeiffer, Rapp, Khalili, Henkel 2023, CoCoFL: Communication- and Computation-Aware Federated "
             "Learning via Partial NN Freezing and Quantization (TMLR 2023)")
    budgeted = True
    weighting = "uniform"  # the code's torch.mean over the round's clients
    preferred_model = "resnet20"
    Options = Options

    def __init__(self, ctx):
        super().__init__(ctx)
        names = [n for n, _ in units(ctx.model)]
        self.names = names
        self.labels = ["stem", *(f"b{i}" for i in range(len(names) - 2)), "head"]
        self.has_params = [any(True for _ in u.parameters()) for _, u in units(ctx.model)]
        self.configs: dict[float, list[tuple[int, int]]] = {}

    # --- configurations -------------------------------------------------------------------
    def config_plan(self, a: int, b: int) -> Plan:
        if (a, b) == (0, len(self.names) - 1):
            return self.full_plan()
        label = f"train {self.labels[a]}" + (f"-{self.labels[b]}" if b > a else "")
        return Plan(steps=(Step(trainable=tuple(self.names[a:b + 1])),), label=label, options=((TRAINED, (a, b)),))

    def full_plan(self) -> Plan:
        return Plan(label="full")

    def memory(self, a: int, b: int) -> int:
        return self.ctx.profiler.memory_of(self.config_plan(a, b))

    def trains_something(self, a: int, b: int) -> bool:
        return any(self.has_params[a:b + 1])

    def fit(self, limit: float) -> list[tuple[int, int]]:
        """The maximal configurations whose measured memory fits ``limit`` bytes (none a subset of another).

        Staircase: for each start a, the widest b that fits; b never decreases with a ([a+1, b] lies within
        [a, b]), so each start resumes from the previous one's b, and [a, b] is maximal iff b grew.
        """
        n, out, prev = len(self.names), [], -1
        for a in range(n):
            if not self.has_params[a]:
                continue
            b = max(a, prev)
            if b == a and not self.memory(a, a) <= limit:
                continue
            while b + 1 < n and self.memory(a, b + 1) <= limit:
                b += 1
            if b > prev:
                out.append((a, b))
                prev = b
            if prev == n - 1:
                break
        return out

    def floor(self) -> tuple[int, int]:
        """The cheapest single-unit configuration: (its unit, its measured bytes)."""
        sizes = {a: self.memory(a, a) for a in range(len(self.names)) if self.has_params[a]}
        a = min(sizes, key=sizes.get)
        return a, sizes[a]

    def setup(self) -> None:
        model = type(self.ctx.model)
        if any(getattr(model, f) is not getattr(FedModel, f) for f in ("forward", "forward_features", "forward_head")):
            raise ConfigError("--model", f"CoCoFL runs a model unit by unit (stem, blocks, head in order); "
                                         f"{self.config.model} has a forward of its own; allowed: resnet20, "
                                         f"preresnet20, preresnet18, fedavg-cnn, vit-tiny")
        full = self.ctx.full_memory
        self.configs = {}
        for budget in self.budgets:
            if budget >= 1:
                self.configs[budget] = [(0, len(self.names) - 1)]
                continue
            found = self.fit(budget * full)
            if not found:
                a, smallest = self.floor()
                frozen = "frozen and int8" if self.options.cocofl_quantize else "frozen"
                raise too_small(budget, smallest, full,
                                f"of CoCoFL (training only the {self.labels[a]}, every other unit {frozen})")
            self.configs[budget] = found

    def plan(self, rnd, client, budget, gen) -> Plan:
        choices = self.configs[budget]
        if len(choices) == 1 or gen is None:
            return self.config_plan(*choices[0])
        i = int(torch.randint(len(choices), (1,), generator=gen, device=gen.device))
        return self.config_plan(*choices[i])

    def schedule(self):
        full, rows = self.ctx.full_memory, []
        for b, choices in self.configs.items():
            for a, z in choices:
                note = f"one of {len(choices)} drawn each round; {self.memory(a, z) / full:.3f} of full memory"
                rows.append(({"budget": b, "note": note}, self.config_plan(a, z)))
        return rows

    # --- training and aggregation ---------------------------------------------------------
    def trainer(self, model, plan, step, lr, client=None):
        return CoCoFLTrainer(self, model, plan, step, lr)

    def add_update(self, agg, plan, model, data) -> None:
        """The code's rule: trained tensors at the client's values, frozen ones at the values it received (the
        server's), all clients of the round counted; only the trained ones are sent (``uploaded``)."""
        agg.add(plan, {n: p.detach() for n, p in model.named_parameters()}, self.client_weight(data))

    # --- reporting ------------------------------------------------------------------------
    def trained_units(self) -> set[int]:
        return {i for cs in self.configs.values() for a, b in cs for i in range(a, b + 1)}

    def notes(self, rounds: int) -> dict:
        return {"configurations": {f"{b:g}": [self.config_plan(a, z).label for a, z in cs]
                                   for b, cs in self.configs.items()},
                "quantized": self.options.cocofl_quantize,
                "untrained_units": [self.labels[i] for i in range(len(self.names))
                                    if self.has_params[i] and i not in self.trained_units()]}

    def warnings(self, rounds: int) -> list[str]:
        missing = self.notes(rounds)["untrained_units"] if self.configs else []
        if not missing:
            return []
        return [f"units {', '.join(missing)} are trained by no configuration at these budgets; they are evaluated "
                "at their initial weights"]
