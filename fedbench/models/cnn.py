"""``fedavg-cnn``: the FedAvg paper's CNN (McMahan et al. 2017, §3) for 28x28 (any square) inputs: two 5x5
convs (32, 64) with 2x2 max-pool, fc 512, classifier, and NO normalisation layer (a Scaler after each
layer for HeteroFL-style runs). Not fedbench's default (resnet20): its 1.6M-weight fc layer holds most of
the memory of any one-layer step, so depth-wise methods cannot split it (a one-block FEDEPTH step measures
0.86 of full memory), and without normalisation small-width methods need gradient clipping.
Channel groups: ``conv1``, ``conv2``, ``fc1``.
"""
from __future__ import annotations

from torch import nn

from fedbench.models import register_model
from fedbench.models.base import FedModel, Scaler


@register_model("fedavg-cnn")
class CNN(FedModel):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28,
                 widths: dict[str, int] | None = None, rate: float = 1.0):
        super().__init__({"conv1": 32, "conv2": 64, "fc1": 512}, widths)
        w = self.widths
        self.spatial = (img_size // 4) ** 2
        self.stem = nn.Identity()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_chans, w["conv1"], 5, padding=2), Scaler(rate), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(w["conv1"], w["conv2"], 5, padding=2), Scaler(rate), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(w["conv2"] * self.spatial, w["fc1"]), Scaler(rate), nn.ReLU()),
        ])
        self.head = nn.Linear(w["fc1"], num_classes)

    def param_dims(self):
        return {"blocks.0.0.weight": ("conv1",), "blocks.0.0.bias": ("conv1",),
                "blocks.1.0.weight": ("conv2", "conv1"), "blocks.1.0.bias": ("conv2",),
                "blocks.2.1.weight": ("fc1", ("conv2", self.spatial)), "blocks.2.1.bias": ("fc1",),
                "head.weight": (None, "fc1")}

