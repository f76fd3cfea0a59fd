"""ViT-Tiny (timm) for small images: dim 192, 3 heads, MLP 768, patch 4 (methods-depth-ssl.md §2.3).

At 32x32 input this is LW-FedSSL's backbone (64 patches + a class token); 28x28 grayscale
input gives 7x7 patches. ``--patch-size`` changes the patch (LW-FedSSL Table 11 uses 8 at
128 px and 16 at 224 px; larger patches make CPU tests cheaper). Built by timm's ``VisionTransformer`` (its initialisation) and
re-exposed as a :class:`FedModel`: ``stem`` = patch embedding + class token + learned
position embedding (+ position dropout), ``blocks`` = the transformer blocks, ``head`` =
final LayerNorm, class-token pooling and the classifier. ``head.pool`` gives the pre-logit
features that self-supervised heads and the linear probe use. No channel groups: plans
only choose blocks and which parameters train.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fedbench.errors import ConfigError
from fedbench.models import register_model
from fedbench.models.base import FedModel

EMBED_DIM, HEADS, MLP_RATIO = 192, 3, 4.0


class Stem(nn.Module):
    """Patch embedding, then the class token prepended and the position embedding added (timm ``_pos_embed``)."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)


class Head(nn.Module):
    """Final LayerNorm on the class token (``pool``: the encoder's features), then the classifier."""

    def __init__(self, norm: nn.Module, fc: nn.Module):
        super().__init__()
        self.norm, self.fc = norm, fc

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, 0])  # LayerNorm is per token: norm(x)[:, 0] == norm(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


@register_model("vit-tiny")
class ViTTiny(FedModel):
    """``depth`` blocks (``--depth``, default 12), ``patch_size`` (``--patch-size``, default 4).

    widths/rate: the common model signature (this model has no channel groups).
    """

    num_features = EMBED_DIM

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 widths: dict[str, int] | None = None, rate: float = 1.0, depth: int = 12, patch_size: int = 4):
        super().__init__({}, widths)
        if depth < 1:
            raise ConfigError("--depth", f"{depth} not allowed; must be >= 1")
        if patch_size < 1 or img_size % patch_size:
            raise ConfigError("--patch-size", f"{patch_size} not allowed; must divide the image size {img_size}")
        vit = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                                embed_dim=EMBED_DIM, depth=depth, num_heads=HEADS, mlp_ratio=MLP_RATIO)
        self.stem = Stem(vit)
        self.blocks = vit.blocks
        self.head = Head(vit.norm, vit.head)
