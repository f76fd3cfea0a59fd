"""The ResNet-20 of the SLT code (methods-width-slt.md §5.6), ``resnet20-slt``.

As ``resnet20`` but with the reference network's two differences: projection shortcuts are
a 3x3 stride-2 conv + BN (used where the stride or width changes), and the head pools with
``AvgPool2d(4)``, so a 32x32 input leaves 2x2 positions and the classifier takes 256 features
(64 channels x 4; each channel owns 4 consecutive features). Same channel groups as
``resnet20``. Needed to compare SLT's configuration sequence and schedule with the paper's.
"""
from __future__ import annotations

from fedbench.models import register_model
from fedbench.models.resnet import ResNet20


@register_model("resnet20-slt")
class ResNet20SLT(ResNet20):
    shortcut_kernel = 3
    pool = 4
