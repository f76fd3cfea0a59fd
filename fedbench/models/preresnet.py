"""Pre-activation ResNets: FeDepth's ``preresnet20`` (methods-depth-ssl.md §1.2) and HeteroFL's
``preresnet18`` (methods-width-slt.md §2.3, §2.5; at the end of this file).

Follows the authors' ``models/preresnet_res_light.py``: stem = 3x3 conv + BN (no ReLU);
nine pre-activation BasicBlocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3), 16/32/64 channels, stride 2
at blocks 3 and 6, 1x1 projection shortcut ("option B", no BN) where the shape changes;
head = BN + ReLU + global average pool + linear. BN keeps no running statistics
(``--no_track_stat``). Kaiming-normal conv/linear weights, BN 1/0, linear bias 0.

``link(x)`` is the authors' parameter-free "skip connection to the classifier"
(``link1``/``link2``): it maps the output of any block to the head's input shape by taking
every s-th pixel and zero-padding channels symmetrically (the CIFAR "option A" shortcut),
so one shared head serves every depth.

Deviation: the authors' block adds ``relu(bn1(x))`` on its identity shortcut (their
``hasattr(self, 'shortcut')`` is always true); we add ``x``, the standard pre-activation
identity (He et al. 2016, "Identity Mappings"). The projection shortcut takes
``relu(bn1(x))`` in both. A ``Scaler`` follows every conv (HeteroFL; identity at full width).

Channel groups (as ``resnet20``): ``stem``; per block ``b{i}.mid`` (conv1 output) and
``b{i}.out`` (the residual stream after the block); identity shortcuts tie streams.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.models import register_model
from fedbench.models.base import FedModel, PointwiseConv, Scaler
from fedbench.models.resnet import ResNet20, norm, prev_group, resnet_layout


def option_a_link(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Subsample a feature map to about ``size`` pixels a side, zero-pad channels (symmetrically) to ``channels``."""
    stride = max(1, x.shape[-1] // size)
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    pad = channels - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2)) if pad > 0 else x


def block_dims(layout, norm1: str, norm2: str, projection: str) -> dict:
    """Channel groups of every pre-activation block's tensors (names of its two norms and its 1x1 projection)."""
    dims = {}
    for g, i, _, project in layout:
        mid, out, p = f"b{i}.mid", f"b{i}.out", f"blocks.{i}."
        dims |= {f"{p}{norm1}.weight": (g,), f"{p}{norm1}.bias": (g,), p + "conv1.weight": (mid, g),
                 f"{p}{norm2}.weight": (mid,), f"{p}{norm2}.bias": (mid,), p + "conv2.weight": (out, mid)}
        if project:
            dims[f"{p}{projection}.weight"] = (out, g)
    return dims


def downsampled(size: int) -> int:
    """Output side of a 3x3, stride-2, padding-1 conv."""
    return (size - 1) // 2 + 1


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut (identity truncated to ``out_w``, or a 1x1 conv)."""

    def __init__(self, in_w: int, mid_w: int, out_w: int, stride: int, project: bool, rate: float):
        super().__init__()
        if not project and out_w > in_w:
            raise ValueError(f"identity shortcut cannot widen {in_w} -> {out_w} channels")
        self.bn1 = norm(in_w)
        self.conv1 = nn.Conv2d(in_w, mid_w, 3, stride, 1, bias=False)
        self.scale1 = Scaler(rate)
        self.bn2 = norm(mid_w)
        self.conv2 = nn.Conv2d(mid_w, out_w, 3, 1, 1, bias=False)
        self.scale2 = Scaler(rate)
        self.shortcut = nn.Sequential(PointwiseConv(in_w, out_w, stride), Scaler(rate)) if project else None
        self.out_w = out_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = self.shortcut(pre) if self.shortcut is not None else x[:, : self.out_w]
        y = self.scale1(self.conv1(pre))
        y = self.scale2(self.conv2(F.relu(self.bn2(y))))
        return y + skip


@register_model("preresnet20")
class PreResNet20(FedModel):
    """Stem, 9 pre-activation blocks (one per FeDepth ``layerK``), head = BN-ReLU-pool-linear."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 widths: dict[str, int] | None = None, rate: float = 1.0):
        full, layout = resnet_layout()
        super().__init__(full, widths)
        self.layout = layout
        self.feature_size = downsampled(downsampled(img_size))
        w = self.widths
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w["stem"], 3, 1, 1, bias=False), Scaler(rate), norm(w["stem"]))
        self.blocks = nn.ModuleList(
            PreActBlock(w[g], w[f"b{i}.mid"], w[f"b{i}.out"], stride, project, rate)
            for g, i, stride, project in layout)
        self.head = nn.Sequential(norm(w[prev_group(layout)]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(w[prev_group(layout)], num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def link(self, x: torch.Tensor) -> torch.Tensor:
        """Any block's output -> the head's input shape (FeDepth ``link1``/``link2``; identity on the last block)."""
        return option_a_link(x, self.widths[prev_group(self.layout)], self.feature_size)

    def param_dims(self):
        dims = {"stem.0.weight": ("stem", None), "stem.2.weight": ("stem",), "stem.2.bias": ("stem",)}
        last = prev_group(self.layout)
        return dims | block_dims(self.layout, "bn1", "bn2", "shortcut.0") | {
            "head.0.weight": (last,), "head.0.bias": (last,), "head.4.weight": (None, last)}

    tied_groups = ResNet20.tied_groups  # same layout format, same residual-stream ties


class HeteroBlock(nn.Module):
    """HeteroFL's pre-activation block: Scaler-BN-ReLU-conv3x3, Scaler-BN-ReLU-conv3x3, plus the identity
    or a 1x1 projection of the pre-activated input (no BN on it)."""

    def __init__(self, in_w: int, mid_w: int, out_w: int, stride: int, project: bool, rate: float):
        super().__init__()
        self.scaler = Scaler(rate)
        self.n1 = norm(in_w)
        self.conv1 = nn.Conv2d(in_w, mid_w, 3, stride, 1, bias=False)
        self.n2 = norm(mid_w)
        self.conv2 = nn.Conv2d(mid_w, out_w, 3, 1, 1, bias=False)
        self.shortcut = PointwiseConv(in_w, out_w, stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.n1(self.scaler(x)))
        skip = self.shortcut(pre) if self.shortcut is not None else x
        y = self.conv1(pre)
        return self.conv2(F.relu(self.n2(self.scaler(y)))) + skip


@register_model("preresnet18")
class PreResNet18(FedModel):
    """HeteroFL's PreResNet-18 for CIFAR (the authors' ``src/models/resnet.py``, methods-width-slt.md §2.3):
    stem conv3x3 (64, no norm); 4 stages x 2 ``HeteroBlock`` at 64/128/256/512 channels, stride 2 at the
    first block of stages 2-4, 1x1 projection shortcuts where the shape changes; head = Scaler-BN-ReLU,
    global average pool, linear. A Scaler stands before every norm (as the code: block input, after
    conv1, before the final norm); BN keeps no running statistics (sBN: HeteroFL's evaluation computes
    them from one pass over the training set). PyTorch's default initialisation, as the code.
    About 11.2M parameters (the paper's table reports 9.6M; reference §2.6 notes the gap).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 widths: dict[str, int] | None = None, rate: float = 1.0):
        full, layout = resnet_layout((64, 128, 256, 512), 2)
        super().__init__(full, widths)
        self.layout = layout
        w = self.widths
        last = prev_group(layout)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w["stem"], 3, 1, 1, bias=False))
        self.blocks = nn.ModuleList(
            HeteroBlock(w[g], w[f"b{i}.mid"], w[f"b{i}.out"], stride, project, rate)
            for g, i, stride, project in layout)
        self.head = nn.Sequential(Scaler(rate), norm(w[last]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(w[last], num_classes))

    def param_dims(self):
        last = prev_group(self.layout)
        return {"stem.0.weight": ("stem", None)} | block_dims(self.layout, "n1", "n2", "shortcut") | {
            "head.1.weight": (last,), "head.1.bias": (last,), "head.5.weight": (None, last)}

    tied_groups = ResNet20.tied_groups
