"""``--precision``: the arithmetic of training and evaluation. fp32, or bf16 through ``torch.autocast``
(matmuls and convolutions in bfloat16, weights, gradients, optimizer state and what is sent kept in
float32). The profiler measures under the same context, so a bf16 run's saved activations are counted
at their real 2 bytes: a device training in bf16 really needs less memory, and its budgets are fractions
of the full model's bf16 memory. fp16 is not offered: it needs a gradient scaler in every trainer,
which fedbench has no GPU here to verify.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The context every training step, measurement and evaluation of a run executes in. Without autocast's
    weight cache: one context spans many optimizer steps, and cached bfloat16 copies of the weights would
    go stale after the first (training then diverges)."""
    dtype = DTYPES[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype, cache_enabled=False)
