"""Measures what a client's configuration costs: peak training memory, FLOPs, bytes.

Memory (reference/profiling.md §2): the exact peak of live tensor bytes over one real
training step after a warm-up step, tracked with a ``TorchDispatchMode`` seeded with the
client's own tensors (model, gradients, optimizer state, batch) so nothing else in the
process is counted. On CUDA the allocator peak is recorded beside it. FLOPs (§1.6):
``FlopCounterMode`` over forward + backward on the meta device, 2 per multiply-add,
conv/matmul/attention only. Forward FLOPs of the inference model per sample from fvcore
(multiply-adds, the papers' convention). Everything is cached per plan shape.
"""
from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from fedbench.errors import ConfigError
from fedbench.models.base import FedModel
from fedbench.plan import Plan, Step
from fedbench.precision import autocast
from fedbench.submodel import set_trainable, tensor_bytes

log = logging.getLogger(__name__)


class Live(TorchDispatchMode):
    """Running current/peak bytes of every tensor storage alive (each storage counted once)."""

    def __init__(self, rounding: int = 1):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.rounding = rounding

    def track(self, t: object) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        size = -(-storage.nbytes() // self.rounding) * self.rounding
        if key in self.live or size == 0:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class Measurement:
    """One configuration's measured training memory (bytes), with its analytic breakdown."""

    peak: int              # live-tensor peak of one step (the figure budgets are checked against)
    params: int            # parameters + buffers of everything the client holds
    grads: int             # gradients of trainable parameters
    optimizer: int         # optimizer state
    activations: int       # tensors saved for backward (distinct storages, weights excluded)
    batch: int             # the input batch as received (uint8 images + labels)
    cuda_peak: int | None = None  # allocator peak minus base plus client state (CUDA only)


class Trainable(Protocol):
    """What the profiler needs from a client's trainer (``fedbench.method.Trainer``)."""

    def loss(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor: ...
    def step(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor: ...
    def state_tensors(self) -> list[torch.Tensor]: ...
    def modules(self) -> list[torch.nn.Module]: ...


def _sdpa_mapping() -> dict:
    """Count CPU fused attention, which FlopCounterMode misses (profiling.md §1.4)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q.shape, k.shape, v.shape))
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda go, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(go.shape, q.shape, k.shape, v.shape))
    return mapping


def dense_bytes(tensors: Mapping[str, torch.Tensor], plan: Plan) -> int:
    """Bytes of sending ``tensors`` dense: elements x dtype size (``Method.sent_bytes``'s default)."""
    return tensor_bytes(tensors.values())


class Profiler:
    """The engine's measuring service; methods only ask ``memory_of(plan)``.

    It measures the method's own training step, and the method, built with the profiler in its
    context, asks it to: the engine hands it the method's trainer factory with ``bind``.
    """

    def __init__(self, build_client: Callable[[Plan], FedModel],
                 sample_shape: tuple[int, ...], num_classes: int, batch_size: int,
                 device: torch.device, seed: int = 0, precision: str = "fp32",
                 on_measure: Callable[[int], None] | None = None):
        self.build_client = build_client
        self.on_measure = on_measure  # told the count of step shapes measured after each new one (progress)
        self.precision = precision  # the run's (fedbench.precision): every measurement runs under it
        self.make_trainer: Callable[[FedModel, Plan, Step], Trainable] | None = None
        self.sent_bytes: Callable[[Mapping[str, torch.Tensor], Plan], int] = dense_bytes
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self._memory: dict[tuple, Measurement] = {}
        self._flops: dict[tuple, int] = {}

    def bind(self, make_trainer: Callable[[FedModel, Plan, Step], Trainable],
             sent_bytes: Callable[[Mapping[str, torch.Tensor], Plan], int] = dense_bytes) -> None:
        """Measure with ``make_trainer(model, plan, step)``: the method's ``trainer`` (once, before any measurement);
        count bytes with ``sent_bytes(tensors, plan)``, the method's encoding (default: dense)."""
        if self.make_trainer is not None:
            raise RuntimeError("the profiler is already bound to a method")
        self.make_trainer = make_trainer
        self.sent_bytes = sent_bytes

    # --- memory ------------------------------------------------------------------------
    def memory_of(self, plan: Plan) -> int:
        """Peak training memory (bytes) of a plan: the maximum over its steps."""
        return max(self.measure(plan, i).peak for i in range(len(plan.steps)))

    @staticmethod
    def step_key(plan: Plan, step_index: int) -> tuple:
        """What one step's cost depends on: widths, blocks held, the step, rate, options (not the other steps)."""
        widths, _, rate, options = plan.shape_key()
        return widths, plan.blocks(), plan.steps[step_index], rate, options

    def measure(self, plan: Plan, step_index: int = 0, samples: int | None = None) -> Measurement:
        """One step at the batch a client of ``samples`` samples trains with, min(batch size, samples); None: the
        profiler's batch size (the largest client's, which budgets are fitted at)."""
        batch = self.batch_size if samples is None else min(self.batch_size, samples)
        key = (self.step_key(plan, step_index), batch)
        if key not in self._memory:
            with autocast(self.precision, self.device):
                self._memory[key] = self._measure(plan, plan.steps[step_index], batch)
            if self.on_measure:
                self.on_measure(len(self._memory))
        return self._memory[key]

    def _batch(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        gen = torch.Generator(device=device).manual_seed(self.seed)
        x = torch.randint(0, 256, (batch, *self.sample_shape), generator=gen, device=device, dtype=torch.uint8)
        y = torch.randint(0, self.num_classes, (batch,), generator=gen, device=device)
        return x, y, gen

    def _measure(self, plan: Plan, step: Step, batch: int | None = None) -> Measurement:
        batch = batch or self.batch_size
        trainer = self._client(plan, step, self.device)
        if not self._memory and batch > 4:  # the first configuration (the full model): can its batch fit at all?
            self._check_fits(trainer, batch)
        x, y, gen = self._batch(batch, self.device)
        activations = self._saved_bytes(trainer, x, y, gen)
        peak = self._peak(trainer, x, y, gen)
        params = [t for m in trainer.modules() for t in [*m.parameters(), *m.buffers()]]
        grads = [p.grad for m in trainer.modules() for p in m.parameters() if p.grad is not None]
        state = trainer.state_tensors()
        optimizer = storage_bytes(state) - storage_bytes(params + grads)
        cuda_peak = self._cuda_peak(trainer, x, y, gen) if self.device.type == "cuda" else None
        return Measurement(peak=peak, params=storage_bytes(params), grads=storage_bytes(grads),
                           optimizer=max(0, optimizer), activations=activations,
                           batch=storage_bytes([x, y]), cuda_peak=cuda_peak)

    @staticmethod
    def _peak(trainer: Trainable, x, y, gen) -> int:
        """Live-tensor peak of one step, after a warm-up step (which creates the optimizer state). The garbage
        collector is off during the step, so when a cycle is freed never depends on what ran before (a full
        collection first would do the same at 0.15 s a measurement: the heap holds torch's and timm's modules)."""
        trainer.step(x, y, gen)
        meter = Live()
        for t in [*trainer.state_tensors(), x, y]:
            meter.track(t)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with meter:
                trainer.step(x, y, gen)
        finally:
            if collecting:
                gc.enable()
        return meter.peak

    def _check_fits(self, trainer: Trainable, batch: int) -> None:
        """Refuse, before measuring it, a batch whose step cannot fit in the memory available. The estimate: the
        peak at batch 4 plus, per further sample, the activations a sample saves for backward (what grows with
        the batch; the peak of a tiny batch is the optimizer step's, so two tiny peaks would not show it)."""
        x, y, gen = self._batch(4, self.device)
        per_sample = max(self._saved_bytes(trainer, x, y, gen) / 4, 1)
        four = self._peak(trainer, x, y, gen)
        need, free = four + per_sample * (batch - 4), available_memory(self.device)
        if need > free:
            raise ConfigError("--batch-size", f"{batch} needs about {need / 1e9:.3g} GB for one training step of the "
                              f"full model, more than the {free / 1e9:.3g} GB of {self.device.type} memory available; "
                              f"allowed: up to about {max(1, int(4 + (free - four) / per_sample))}")

    @staticmethod
    def _saved_bytes(trainer: Trainable, x, y, gen) -> int:
        """Saved-for-backward activations of one forward, distinct storages, weights excluded."""
        own = {t.untyped_storage()._cdata for m in trainer.modules() for t in [*m.parameters(), *m.buffers()]}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s._cdata not in own:
                seen[s._cdata] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = trainer.loss(x, y, gen)
        if loss.requires_grad:
            loss.backward()
        for m in trainer.modules():
            m.zero_grad(set_to_none=True)
        return sum(seen.values())

    @staticmethod
    def _cuda_peak(trainer: Trainable, x, y, gen) -> int:
        """Allocator peak of one step minus what was allocated before, plus the client's state (§2.5)."""
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.step(x, y, gen)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base + storage_bytes([*trainer.state_tensors(), x, y])

    # --- FLOPs --------------------------------------------------------------------------
    def train_flops(self, plan: Plan, step_index: int = 0) -> int:
        """Training FLOPs per sample of one step (forward + backward of what runs), on meta."""
        key = self.step_key(plan, step_index)
        if key not in self._flops:
            meta = torch.device("meta")
            with meta:
                trainer = self._client(plan, plan.steps[step_index], meta)
                x = torch.zeros((2, *self.sample_shape), dtype=torch.uint8)
                y = torch.zeros(2, dtype=torch.long)
            with FlopCounterMode(display=False, custom_mapping=_sdpa_mapping()) as counter:
                loss = trainer.loss(x, y, None)
                if loss.requires_grad:
                    loss.backward()
            self._flops[key] = counter.get_total_flops() // 2
        return self._flops[key]

    def bytes_of(self, plan: Plan) -> tuple[int, int]:
        """Bytes down (the whole sub-model plus index overhead, stateless) and up (trained tensors), each in the
        method's encoding (``bind``'s ``sent_bytes``; dense without one)."""
        with torch.device("meta"):
            model = self.build_client(plan)
        down = self.sent_bytes(dict([*model.named_parameters(), *model.named_buffers()]), plan)
        up = self.sent_bytes({n: p for n, p in model.named_parameters() if any(s.trains(n) for s in plan.steps)}, plan)
        return down + plan.index_bytes, up

    def _client(self, plan: Plan, step: Step, device: torch.device) -> Trainable:
        model = self.build_client(plan).to(device).train()
        set_trainable(model, step)
        if self.make_trainer is None:
            raise RuntimeError("Profiler.bind(the method's trainer factory) before measuring")
        return self.make_trainer(model, plan, step)


def available_memory(device: torch.device) -> int:
    """Bytes a step may use: the host's available memory (psutil) on a CPU, the GPU's free memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def forward_macs(model: torch.nn.Module, sample_shape: tuple[int, ...]) -> int:
    """fvcore's forward count of the inference model for one sample (multiply-adds)."""
    import warnings

    model = model.eval()
    x = torch.zeros((1, *sample_shape), device=next(model.parameters()).device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's unsupported-op notes and torch.jit deprecation
        from fvcore.nn import FlopCountAnalysis
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        analysis = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = int(analysis.total())
    model.train()
    return total


class Traffic:
    """Bytes sent down per client-round (profiling.md §3.3).

    Stateless clients (default) receive every tensor of their sub-model each round, plus the
    plan's index overhead. Stateful clients keep what they received and get a tensor again
    only when the server changed it, or their slice of it changed, since they last synced.
    """

    def __init__(self, stateful: bool):
        self.stateful = stateful
        self.version: dict[str, int] = {}
        self.held: dict[int, dict[str, tuple]] = {}

    def down(self, client: int, plan: Plan, sub: FedModel, global_model: FedModel,
             encode: Callable[[Mapping[str, torch.Tensor], Plan], int] = dense_bytes) -> int:
        """Bytes the client receives: the plan's index overhead plus the tensors sent, in the method's encoding
        (``encode(tensors, plan)``: ``Method.sent_bytes``)."""
        dims = global_model.param_dims()
        held = self.held.setdefault(client, {})
        index = plan.index_map
        sent = {}
        for name, t in [*sub.named_parameters(), *sub.named_buffers()]:
            groups = [g if isinstance(g, str) else g[0] for g in dims.get(name, ()) if g is not None]
            signature = (self.version.get(name, 0), tuple(index.get(g) for g in groups))
            if self.stateful and held.get(name) == signature:
                continue
            if self.stateful:
                held[name] = signature
            sent[name] = t
        return plan.index_bytes + encode(sent, plan)

    def state_dict(self) -> dict:
        return {"version": dict(self.version), "held": {c: dict(h) for c, h in self.held.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.version = dict(state["version"])
        self.held = {int(c): dict(h) for c, h in state["held"].items()}

    def commit(self, names: Iterable[str], rnd: int) -> None:
        """The server changed these tensors in round ``rnd``."""
        for name in names:
            self.version[name] = rnd + 1
