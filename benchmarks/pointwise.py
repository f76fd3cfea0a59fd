"""Cost of ``PointwiseConv`` (issue 13): ResNet-20 training steps with its projection shortcuts as
sampled stride-1 1x1 convolutions vs. PyTorch's strided ``nn.Conv2d`` (oneDNN's strided 1x1 kernel).

The strided kernel corrupts the heap for 2-15 input channels in channels-last at odd batches >= 3
with 2+ threads, so the narrow width is timed on one thread, where that kernel is safe.

    python benchmarks/pointwise.py --steps 30
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.models import create_model
from fedbench.models.base import PointwiseConv, scaled


def resnet(width: float, strided_conv: bool) -> nn.Module:
    full = create_model("resnet20").full_widths
    model = create_model("resnet20", widths={g: scaled(c, width) for g, c in full.items()})
    if strided_conv:  # the plain strided 1x1 convolution, same weights
        for block in model.blocks:
            if block.shortcut is not None and isinstance(block.shortcut[0], PointwiseConv):
                old = block.shortcut[0]
                new = nn.Conv2d(old.in_channels, old.out_channels, 1, old.stride, bias=False)
                new.weight.data.copy_(old.weight.data)
                block.shortcut[0] = new
    return model.to(memory_format=torch.channels_last)


def step_ms(model: nn.Module, batch: int, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, CPU, channels-last, SGD step of ResNet-20 (ms; ratio = PointwiseConv / strided)")
    for width, batch, nthreads in ((1.0, 32, threads), (1.0, 8, threads), (0.25, 32, 1), (0.25, 8, 1)):
        torch.set_num_threads(nthreads)
        torch.manual_seed(0)
        ours, theirs = (step_ms(resnet(width, strided), batch, args.steps) for strided in (False, True))
        print(f"width {width:<5g} batch {batch:<3d} threads {nthreads}: PointwiseConv {ours:7.2f}  "
              f"strided nn.Conv2d {theirs:7.2f}  ratio {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
