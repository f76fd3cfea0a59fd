"""The small-model baseline (methods/small.py): SLT's code rounds its small model's widths down."""
from __future__ import annotations

import math

from fedbench.methods._width import WIDTHS
from tests.conftest import small_run


def test_small_model_keeps_floor_w_c_channels_of_every_group_and_is_evaluated_at_them():
    """ResNet-20 on fmnist-mini at budget 0.25: the chosen width w keeps floor(w C) channels (at least one) of
    each group of C, as SLT's SubsetNets (int(C * subset_factor), methods-width-slt.md §5.7); here ceil differs."""
    run = small_run(method="small", model="resnet20", memory_budget=0.25, rounds=1, clients_per_round=1)
    m, full = run.method, run.model.full_widths
    (w,) = [w for w in WIDTHS if m.width_plan(w) == m.small]
    widths = m.small.widths(full)
    assert widths == {g: max(1, math.floor(w * c)) for g, c in full.items()}
    assert any(math.ceil(w * c) != widths[g] for g, c in full.items())       # the rounding matters at this w
    assert run.profiler.memory_of(m.small) <= 0.25 * run.ctx.full_memory
    wider = [v for v in WIDTHS if v > w and m.width_plan(v).widths(full) != widths]
    assert run.profiler.memory_of(m.width_plan(wider[0])) > 0.25 * run.ctx.full_memory  # the widest that fits
    assert m.small.label == f"w={w:.4g}" and m.plan(0, 0, 0.25, None) is m.small
    assert m.eval_model(run.model, 0).widths == widths
    summary = run.execute()
    assert summary["violations"] == 0 and f"small model ({m.small.label})" in summary["evaluation"]
