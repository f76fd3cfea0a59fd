"""Narrow sub-models with ragged batches train on the CPU without crashing the process (issue 13).

oneDNN's strided 1x1 backward-weights kernel (torch 2.14.1, AVX-512, 2+ threads) corrupted the
heap for ResNet projection shortcuts with 2-15 input channels in channels-last at odd batch sizes
>= 3 (``models.base.PointwiseConv`` avoids it). The runs happen in a child process with two
threads, so a native crash fails this test instead of killing the suite.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Every width method, at budgets whose widths give 2-8 channel stems; 35 samples per client at
# batch 8 end every epoch with a batch of 3.
SCRIPT = textwrap.dedent("""
    import math, sys, torch
    from fedbench.config import resolve
    from fedbench.engine import prepare
    torch.set_num_threads(2)
    method, budget = sys.argv[1], sys.argv[2]
    run = prepare(resolve(dict(method=method, model="resnet20", dataset="synthetic:3x32:140", clients=4,
                               clients_per_round=4, rounds=2, batch_size=8, memory_budget=budget, device="cpu",
                               client_batching="off", quiet=True)))
    run.execute()
    assert all(math.isfinite(r["train_loss"]) for r in run.rows), run.rows
    print([plan.label for _, plan in run.method.schedule()], "ok")
""")


@pytest.mark.parametrize("method, budget", [("small", "0.125"), ("heterofl", "0.125,0.25,0.5"),
                                            ("fedrolex", "0.125,0.25,0.5"), ("fd", "0.125,0.25,0.5"),
                                            ("slt", "0.25")])
def test_narrow_widths_with_ragged_batches_train_on_cpu(method, budget):
    done = subprocess.run([sys.executable, "-c", SCRIPT, method, budget], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip().endswith("ok")
