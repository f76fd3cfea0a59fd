"""FedAvg with gradient accumulation over micro-batches (a memory baseline; standard practice, no paper).

Splitting a mini-batch into micro-batches and summing their gradients before one optimizer
step is folklore of deep-learning practice (e.g. PyTorch's and Hugging Face's "gradient
accumulation"); no FL paper introduces it, so none is cited. It is the obvious baseline for
memory-constrained clients: every client still trains the full model with the same effective
batch, and pays for memory with time, not accuracy.

A client with budget b splits each local batch of B = ``--batch-size`` samples into
ceil(B / m) consecutive chunks of at most m samples (the last one smaller when m does not
divide B) and back-propagates each chunk's mean cross-entropy weighted by chunk / B, so the
summed gradient is the full batch's mean gradient; then one SGD step (momentum, weight decay,
clipping as FedAvg). m is the largest micro-batch whose *measured* peak (the profiler runs this
very accumulation step) fits b x the full model's memory, searched over 1..B in ``setup``;
b >= 1 means m = B, which is exactly FedAvg. The whole batch is augmented and normalised once
before it is split, so the augmentation draws are FedAvg's (its float copy is part of the peak).

What it saves is activations only: parameters, gradients and momentum stay, and from the second
chunk on autograd adds each new gradient into the held one through a temporary of the largest
parameter's size. So the peak need not fall with m (the cnn, whose fc1 weight dominates, measures
1.02 of FedAvg's peak at m = 16 of 32 and 0.88 at m = 1; ResNet-20 at batch 32: 0.115 at m = 1);
``fit_largest`` then searches a non-monotone sequence, and what it returns is always measured to fit.

BatchNorm: batch statistics are computed per micro-batch, so with BN-bearing models (ResNet-20,
PreResNet) training with m < B is *not* equivalent to the full batch (smaller, noisier
normalisation batches); norm-free models (``fedavg-cnn``) and LayerNorm ViTs are equivalent within
float rounding. Evaluation: the full global model. FLOPs per sample are FedAvg's.

Profiling note: the profiler's ``activations`` breakdown is one forward of ``Trainer.loss``,
here the accumulated objective over all chunks at once (the same gradient and FLOPs), so it
shows the full batch's saved activations; the measured ``peak`` (what budgets are checked
against) is the real chunk-by-chunk step.
"""
from __future__ import annotations

import torch

from fedbench.budget import fit_largest, too_small
from fedbench.method import Method, Trainer, register_method
from fedbench.plan import Plan

MICRO = "micro_batch"


class AccumTrainer(Trainer):
    """One SGD step per batch, its gradient accumulated over micro-batches of at most ``micro`` samples."""

    def __init__(self, method, model, plan, step, lr, micro: int):
        super().__init__(method, model, plan, step, lr)
        self.micro = micro

    def chunks(self, x: torch.Tensor, y: torch.Tensor):
        """(chunk x, chunk y, chunk size / batch size) of the normalised batch."""
        n = len(y)
        return [(xc, yc, len(yc) / n) for xc, yc in zip(x.split(self.micro), y.split(self.micro))]

    def chunk_loss(self, x: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
        return self.method.loss(self.model, x, y, self.plan, self.step_spec, **self.client) * weight

    def loss(self, x, y, gen):
        """The accumulated objective in one graph: sum of the weighted chunk losses (its gradient is the step's)."""
        return sum(self.chunk_loss(xc, yc, w) for xc, yc, w in self.chunks(self.prepare(x, gen), y))

    def step(self, x, y, gen):
        if len(y) <= self.micro:
            return super().step(x, y, gen)   # one chunk: exactly FedAvg's step
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=y.device)
        for xc, yc, w in self.chunks(self.prepare(x, gen), y):
            loss = self.chunk_loss(xc, yc, w)
            loss.backward()                  # frees this chunk's activations before the next chunk runs
            total += loss.detach()
        if self.method.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                           self.method.grad_clip)
        self.opt.step()
        return total


@register_method
class FedAvgAccum(Method):
    name = "fedavg-accum"
    description = ("FedAvg of the full model; each batch's gradient accumulated over the largest micro-batch "
                   "whose measured peak fits the budget (same effective batch; BN statistics per micro-batch)")
    paper = "standard gradient accumulation (no paper); FedAvg: McMahan et al. 2017 (arXiv 1602.05629)"
    budgeted = True
    trains_batched = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.micro: dict[float, int] = {}

    @property
    def batch(self) -> int:
        """The largest batch any client trains with (the profiler's, which budgets are fitted at)."""
        return self.ctx.profiler.batch_size

    def micro_plan(self, m: int) -> Plan:
        if m >= self.batch:
            return self.full_plan()
        return Plan(label=f"micro={m}", options=((MICRO, m),))

    def fit_micro(self, budget: float) -> int:
        if budget >= 1:
            return self.batch
        memory = self.ctx.profiler.memory_of
        sizes = list(range(1, self.batch + 1))
        best = fit_largest(sizes, lambda m: memory(self.micro_plan(m)), budget * self.ctx.full_memory)
        if best is None:
            raise too_small(budget, memory(self.micro_plan(1)), self.ctx.full_memory, "(micro-batch 1)")
        return best

    def setup(self) -> None:
        self.micro = {b: self.fit_micro(b) for b in self.budgets}

    def plan(self, rnd, client, budget, gen) -> Plan:
        return self.micro_plan(self.micro[budget])

    def schedule(self):
        rows = []
        for b, m in self.micro.items():
            chunks = -(-self.batch // m)
            note = f"{chunks} micro-batch(es) of <= {m} per batch of {self.batch}, one SGD step"
            rows.append(({"budget": b, "note": note}, self.micro_plan(m)))
        return rows

    def trainer(self, model, plan, step, lr, client=None) -> Trainer:
        micro = plan.option(MICRO)
        if micro is None:
            return super().trainer(model, plan, step, lr, client)
        return AccumTrainer(self, model, plan, step, lr, int(micro))
