"""CIFAR ResNet-20 (He et al. 2016, §4.2) with 1x1 projection shortcuts ("option B").

BatchNorm keeps no running statistics (``track_running_stats=False``), as in the SLT and
FEDEPTH code and HeteroFL's static BN: it always normalises with batch statistics.
Channel groups: ``stem``; per block ``b{i}.mid`` (conv1 output) and ``b{i}.out`` (conv2
output = the residual stream after the block). Identity shortcuts tie streams in a stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.models import register_model
from fedbench.models.base import FedModel, PointwiseConv, Scaler

STAGES = (16, 32, 64)
BLOCKS_PER_STAGE = 3


def norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU.

    ``project`` (decided at full width) selects a conv + BN shortcut (square ``shortcut_kernel``,
    conv1's stride). Otherwise the identity shortcut keeps the first ``out_w`` input channels:
    the truncating shortcut SLT needs at its full-width -> head boundary (methods-width-slt.md
    §5.2); equal widths make it a plain identity.
    """

    def __init__(self, in_w: int, mid_w: int, out_w: int, stride: int, project: bool, rate: float,
                 shortcut_kernel: int = 1):
        super().__init__()
        if not project and out_w > in_w:
            raise ValueError(f"identity shortcut cannot widen {in_w} -> {out_w} channels")
        self.conv1 = nn.Conv2d(in_w, mid_w, 3, stride, 1, bias=False)
        self.scale1, self.bn1 = Scaler(rate), norm(mid_w)
        self.conv2 = nn.Conv2d(mid_w, out_w, 3, 1, 1, bias=False)
        self.scale2, self.bn2 = Scaler(rate), norm(out_w)
        k = shortcut_kernel
        conv = PointwiseConv(in_w, out_w, stride) if k == 1 else nn.Conv2d(in_w, out_w, k, stride, k // 2, bias=False)
        self.shortcut = nn.Sequential(conv, Scaler(rate), norm(out_w)) if project else None
        self.out_w = out_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.scale1(self.conv1(x))))
        y = self.bn2(self.scale2(self.conv2(y)))
        skip = self.shortcut(x) if self.shortcut is not None else x[:, : self.out_w]
        return F.relu(y + skip)


def resnet_layout(stages: tuple[int, ...] = STAGES, per_stage: int = BLOCKS_PER_STAGE
                  ) -> tuple[dict[str, int], list[tuple[str, int, int, bool]]]:
    """Full group widths and, per block, (input group, block index, stride, projection shortcut)."""
    full = {"stem": stages[0]}
    layout = []
    prev = "stem"
    for s, c in enumerate(stages):
        for j in range(per_stage):
            i = s * per_stage + j
            full[f"b{i}.mid"] = full[f"b{i}.out"] = c
            stride = 2 if (s > 0 and j == 0) else 1
            layout.append((prev, i, stride, stride != 1 or full[prev] != c))
            prev = f"b{i}.out"
    return full, layout


def prev_group(layout) -> str:
    """The residual-stream group feeding the classifier."""
    return f"b{layout[-1][1]}.out"


@register_model("resnet20")
class ResNet20(FedModel):
    """3 stages x 3 BasicBlocks at 16/32/64 channels, global average pool, linear classifier.

    Subclasses may set ``shortcut_kernel`` (projection conv size) and ``pool`` (AvgPool2d kernel
    instead of the global pool; the classifier then takes ``pool_positions`` features per channel).
    """

    shortcut_kernel: int = 1
    pool: int = 0  # 0: global average pool

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 widths: dict[str, int] | None = None, rate: float = 1.0):
        full, layout = resnet_layout()
        super().__init__(full, widths)
        self.layout = layout
        w = self.widths
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w["stem"], 3, 1, 1, bias=False), Scaler(rate),
                                  norm(w["stem"]), nn.ReLU())
        self.blocks = nn.ModuleList(
            BasicBlock(w[g], w[f"b{i}.mid"], w[f"b{i}.out"], stride, project, rate, self.shortcut_kernel)
            for g, i, stride, project in layout)
        side = (img_size - 1) // 4 + 1  # after the two stride-2 stages
        self.pool_positions = (side // self.pool) ** 2 if self.pool else 1
        self.head = nn.Sequential(nn.AvgPool2d(self.pool) if self.pool else nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(w[prev_group(layout)] * self.pool_positions, num_classes))

    def param_dims(self):
        dims = {"stem.0.weight": ("stem", None), "stem.2.weight": ("stem",), "stem.2.bias": ("stem",)}
        for g, i, _, project in self.layout:
            mid, out, p = f"b{i}.mid", f"b{i}.out", f"blocks.{i}."
            dims |= {p + "conv1.weight": (mid, g), p + "bn1.weight": (mid,), p + "bn1.bias": (mid,),
                     p + "conv2.weight": (out, mid), p + "bn2.weight": (out,), p + "bn2.bias": (out,)}
            if project:
                dims |= {p + "shortcut.0.weight": (out, g), p + "shortcut.2.weight": (out,),
                         p + "shortcut.2.bias": (out,)}
        last, n = prev_group(self.layout), self.pool_positions
        dims["head.2.weight"] = (None, (last, n) if n > 1 else last)
        return dims

    def tied_groups(self):
        ties: list[list[str]] = []
        for g, i, _, project in self.layout:
            if project or not ties:
                ties.append([g] if not project else [])
            ties[-1].append(f"b{i}.out")
        return [t for t in ties if len(t) > 1]

