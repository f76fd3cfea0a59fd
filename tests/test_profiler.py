"""The profiler: exact CPU live-tensor meter, breakdown, width/freezing effects, FLOPs, CUDA agreement."""
from __future__ import annotations

import gc
from functools import partial

import torch
from torch import nn

from fedbench.config import resolve
from fedbench.data import Dataset
from fedbench.method import Context, Method, NoOptions
from fedbench.models import create_model
from fedbench.models.base import FedModel
from fedbench.plan import Plan, Step
from fedbench.profiler import Live, Profiler
from fedbench.submodel import build_submodel
from fedbench.methods._width import first_k
from tests.conftest import needs_cuda


class Tiny(FedModel):
    """Flatten -> Linear(4, 3) -> ReLU -> Linear(3, 2): small enough to count by hand."""

    def __init__(self, widths=None, **_):
        super().__init__({"hidden": 3}, widths)
        self.stem = nn.Flatten()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, self.widths["hidden"]), nn.ReLU())])
        self.head = nn.Linear(self.widths["hidden"], 2)


def profiler_for(build, sample_shape, batch, device="cpu", classes=10):
    cfg = resolve({"device": device})
    ds = Dataset("t", torch.zeros((1, *sample_shape), dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                 torch.zeros((1, *sample_shape), dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                 classes, (0.5,) * sample_shape[0], (0.5,) * sample_shape[0], False)
    model = build().to(device)
    prof = Profiler(partial(build_submodel, build, model), sample_shape, classes, batch, torch.device(device))
    method = Method(Context(cfg, ds, model, build, prof, NoOptions()))
    prof.bind(partial(method.trainer, lr=0.1))
    return prof, model


def test_tiny_model_counted_to_the_byte():
    prof, _ = profiler_for(Tiny, (1, 2, 2), batch=5, classes=2)
    m = prof.measure(Plan())
    params = (4 * 3 + 3 + 3 * 2 + 2) * 4
    assert m.params == params and m.grads == params and m.optimizer == params  # SGD momentum: one buffer
    assert m.batch == 5 * 4 * 1 + 5 * 8  # uint8 images + int64 labels
    # saved for backward: normalised input (5x4), linear-1 output for ReLU (5x3)... each a float32 storage;
    # we only assert what is certain: the float input and the hidden activations are saved.
    assert m.activations >= (5 * 4 + 5 * 3) * 4
    assert m.peak >= m.params + m.grads + m.optimizer + m.batch
    assert m.peak == prof._measure(Plan(), Plan().steps[0]).peak  # deterministic


def test_live_meter_counts_each_storage_once():
    meter = Live()
    x = torch.zeros(10)
    with meter:
        y = x + 1
        view = y[:5]  # a view shares y's storage
        del view
        z = y * 2
    assert meter.peak == 2 * 40  # y and z, each 10 float32
    del y, z
    assert meter.current == 0


class CyclicStep:
    """A trainer whose step drops a 4 KB tensor that a reference cycle holds, then allocates another 4 KB."""

    def step(self, x, y, gen):
        held = [torch.ones(1024)]
        held.append(held)  # freed only by the garbage collector
        del held
        return torch.ones(1024)

    def state_tensors(self):
        return []


def test_a_cycle_freed_mid_step_counts_to_the_end_of_the_step_whatever_the_collector_state():
    """The collector is off while the step is metered: when it would have run (gc thresholds, what ran
    before) cannot change a measured peak."""
    x, y = torch.zeros(1), torch.zeros(1)
    thresholds = gc.get_threshold()
    try:
        peaks = []
        for threshold in (thresholds, (1, 1, 1)):  # (1, 1, 1): a collection at almost every allocation
            gc.set_threshold(*threshold)
            peaks.append(Profiler._peak(CyclicStep(), x, y, None))
    finally:
        gc.set_threshold(*thresholds)
    assert peaks == [2 * 4096 + 8, 2 * 4096 + 8]  # both tensors, and x and y (4 B each)
    assert gc.isenabled()


def resnet(**kw):
    return create_model("resnet20", num_classes=10, in_chans=3, **kw)


def test_resnet20_width_half_halves_activations_and_freezing_lowers_cost():
    prof, model = profiler_for(resnet, (3, 32, 32), batch=32)
    full = prof.measure(Plan())
    half = prof.measure(Plan.of(first_k(model.full_widths, 0.5)))
    assert 0.45 <= half.activations / full.activations <= 0.55
    assert 0.45 <= half.peak / full.peak <= 0.55  # profiling.md §4.3: 0.494
    # within 15% of the analytic breakdown (profiling.md §2.5)
    analytic = full.params + full.grads + full.optimizer + full.activations + full.batch
    assert abs(full.peak / analytic - 1) < 0.15
    frozen = Plan(steps=(Step(trainable=tuple(f"blocks.{i}" for i in range(4, 9)) + ("head",)),))
    assert prof.memory_of(frozen) < 0.6 * full.peak
    assert prof.train_flops(frozen) < prof.train_flops(Plan())
    # FLOPs match reference/profiling.md §1.3 exactly (fwd+bwd, all trainable, per sample)
    assert prof.train_flops(Plan()) == 243_994_368


@needs_cuda
def test_cuda_allocator_peak_agrees_with_live_meter():
    torch.backends.cudnn.enabled = False  # cuDNN workspaces are outside any tensor (profiling.md §2.4)
    try:
        prof, _ = profiler_for(resnet, (3, 32, 32), batch=32, device="cuda")
        m = prof.measure(Plan())
        assert abs(m.cuda_peak / m.peak - 1) < 0.05
    finally:
        torch.backends.cudnn.enabled = True
