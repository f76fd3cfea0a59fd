"""The structure every fedbench model exposes, so that plans can slice and prune it.

A model is ``stem -> blocks[i] ... -> head`` (timm's ``forward_features`` / ``forward_head``
split). It is built at explicit per-group widths: a *channel group* is one set of channels
that a plan indexes together (a conv's output channels, a residual stream). ``param_dims``
says, for each parameter, which group indexes each of its dimensions, so that extraction
and masked aggregation are one generic slice / scatter (no guessing from key names).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# One entry per tensor dimension: None (never sliced), a group name, or (group, repeat)
# for a flattened feature dimension where each channel owns `repeat` consecutive features.
Dim = str | tuple[str, int] | None


def scaled(full: int, width: float, rounding: str = "ceil") -> int:
    """Channels kept at width factor ``width``: ceil (HeteroFL/FedRolex code) or floor (SLT code), >= 1."""
    exact = full * width
    kept = int(-(-exact // 1)) if rounding == "ceil" else int(exact + 1e-9)
    return max(1, min(full, kept))


class Scaler(nn.Module):
    """HeteroFL's Scaler (§2.3): divides by the client's width rate in training, identity in eval."""

    def __init__(self, rate: float = 1.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.rate if self.training and self.rate != 1.0 else x


class PointwiseConv(nn.Conv2d):
    """A bias-free 1x1 convolution (projection shortcuts) that samples a strided input first and
    convolves at stride 1: the same values and gradients, with the sampled input a view of ``x``.

    Why: oneDNN's strided 1x1 backward-weights kernel (torch 2.14.1, AVX-512 CPUs, 2+ threads)
    corrupts the heap for 2-15 input channels in channels-last at odd batch sizes >= 3, i.e. the
    narrow widths and ragged last batches of width methods (issue 13; tests/test_narrow_widths.py).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight)


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class FedModel(nn.Module):
    """Base class: subclasses set ``stem``, ``blocks`` (nn.ModuleList), ``head`` and declare groups."""

    stem: nn.Module
    blocks: nn.ModuleList
    head: nn.Module

    def __init__(self, full_widths: Mapping[str, int], widths: Mapping[str, int] | None = None):
        super().__init__()
        unknown = set(widths or {}) - set(full_widths)
        if unknown:
            raise KeyError(f"unknown channel groups {sorted(unknown)}")
        self.full_widths = dict(full_widths)
        self.widths = {**self.full_widths, **(widths or {})}

    # --- structure a plan relies on -------------------------------------------------
    def param_dims(self) -> dict[str, tuple[Dim, ...]]:
        """Per parameter name, which group indexes each dimension (missing = never sliced)."""
        return {}

    def tied_groups(self) -> list[list[str]]:
        """Groups that must share one index set (residual streams joined by identity shortcuts)."""
        return []

    def layer_groups(self) -> list[tuple[str, tuple[str, ...]]]:
        """Layers in forward order: (output group, names of the parameters the layer owns).

        A layer owns the parameters whose first dimension its group indexes (a conv or linear
        with its norm; a ResNet's projection shortcut into that stream). Derived from
        ``param_dims``, which lists parameters in forward order; parameters owned by no group
        (the classifier) belong to no layer. Used by layer-wise methods (SLT's K layers).
        """
        layers: dict[str, list[str]] = {}
        for name, dims in self.param_dims().items():
            if dims and isinstance(dims[0], str):
                layers.setdefault(dims[0], []).append(name)
        return [(g, tuple(names)) for g, names in layers.items()]

    # --- forward --------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, blocks: Sequence[int] | None = None) -> torch.Tensor:
        """Stem then the given blocks in order (all by default).

        A leading run of units without trainable parameters runs without autograd, so frozen
        prefixes store no activations (DESIGN.md: frozen layers save neither activations nor grads).
        """
        order = range(len(self.blocks)) if blocks is None else blocks
        for unit in [self.stem, *(self.blocks[i] for i in order)]:
            x = self._run(unit, x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.head, x)

    def forward(self, x: torch.Tensor, blocks: Sequence[int] | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, blocks))

    @staticmethod
    def _run(unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad and not _has_trainable(unit):
            with torch.no_grad():
                return unit(x)
        return unit(x)
