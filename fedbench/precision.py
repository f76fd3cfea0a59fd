"""``--precision``: the arithmetic of training and evaluation. fp32, or bf16 through ``torch.autocast``
(matmuls and convolutions in bfloat16, weights, gradients, optimizer state and what is sent kept in
float32). The profiler measures under the same context, so a bf16 run's saved activations are counted
at their real 2 bytes: a device training in bf16 really needs less memory, and its budgets are fractions
of the full model's bf16 memory. fp16 is not offered: it needs a gradient scaler in every trainer,
which fedbench has no GPU here to verify.

``auto`` (the default) is bf16 where the device runs it natively (a CPU with AVX512-BF16 or AMX-BF16, a
GPU that supports it) and a few SGD steps of the run's model at its batch size, timed at start-up, are
at least 10% faster in bf16 than in fp32; fp32 otherwise. CPUs without those instructions emulate bf16
(measured on an AVX2-only EPYC: a ResNet-20 step 12x slower than fp32), so bf16 asked for there gets a
warning with the measured slowdown.
"""
from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # CPU flags of bf16 arithmetic in hardware
FASTER = 0.9  # auto takes bf16 when its step takes at most this share of fp32's


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The context every training step, measurement and evaluation of a run executes in. Without autocast's
    weight cache: one context spans many optimizer steps, and cached bfloat16 copies of the weights would
    go stale after the first (training then diverges)."""
    dtype = DTYPES[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype, cache_enabled=False)


@cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ()))
    except OSError:
        return frozenset()


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(f in cpu_flags() for f in NATIVE_BF16)


def step_seconds(build: Callable[[], torch.nn.Module], shape: tuple[int, ...], classes: int, batch: int,
                 device: torch.device, precision: str, steps: int) -> float:
    """Seconds of one SGD step of a fresh ``build()`` on a random batch, the fastest of ``steps`` after a warm-up."""
    model = build().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn((batch, *shape), generator=gen).to(device), torch.randint(classes, (batch,), generator=gen).to(device)
    best = float("inf")
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(precision, device):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def choose(precision: str, build: Callable[[], torch.nn.Module], shape: tuple[int, ...], classes: int, batch: int,
           device: torch.device) -> str:
    """``precision`` made concrete: ``auto`` by the rule in the module docstring; bf16 on a device that emulates it
    is kept, with a warning that gives the measured slowdown."""
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return "fp32"
    native = native_bf16(device)
    fp32, bf16 = (step_seconds(build, shape, classes, batch, device, p, 3 if native else 1) for p in ("fp32", "bf16"))
    if precision == "auto":
        chosen = "bf16" if bf16 <= FASTER * fp32 else "fp32"
        log.info("--precision auto: %s (a training step %.1f ms in fp32, %.1f ms in bf16)", chosen, 1e3 * fp32,
                 1e3 * bf16)
        return chosen
    if not native:
        log.warning("--precision bf16: this CPU has no bf16 instructions (%s) and emulates it: a training step "
                    "measured %.1fx slower than in fp32 (%.0f vs %.0f ms); --precision auto would use fp32",
                    " or ".join(NATIVE_BF16), bf16 / fp32, 1e3 * bf16, 1e3 * fp32)
    return precision
