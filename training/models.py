"""ViT backbones (built with timm) and the DINO projection head.

Backbones are timm ``VisionTransformer``s with a CLS token, no classifier and ``dynamic_img_size`` so
one model takes global and local crops and any inference size. The head follows the official
``vision_transformer.DINOHead``; its last layer keeps the official ``weight_g`` / ``weight_v`` keys so
checkpoints map one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# name -> (embed_dim, depth, num_heads); the official sizes plus small ones for CPU work and tests.
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_nano": (96, 2, 2),
    "vit_micro": (192, 4, 3),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone; stored in checkpoints and the model card."""

    arch: str
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    img_size: int = 224  # position-embedding grid = img_size / patch_size per side
    drop_path_rate: float = 0.0

    @classmethod
    def from_arch(cls, arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0):
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        embed_dim, depth, num_heads = ARCHS[arch]
        return cls(arch, patch_size, embed_dim, depth, num_heads, img_size, drop_path_rate)

    def to_dict(self) -> dict:
        return asdict(self)


def build_backbone(spec: BackboneSpec) -> VisionTransformer:
    """A timm ViT returning the final-norm CLS token (``num_classes=0``, token pooling)."""
    return VisionTransformer(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
        drop_path_rate=spec.drop_path_rate,
    )


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g · v / ‖v‖ per output row (Salimans & Kingma, 2016).

    Parameters are named like ``torch.nn.utils.weight_norm``'s (``weight_g``, ``weight_v``), the keys of
    the official DINO checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU) → L2 normalisation → weight-normalised prototypes.

    ``norm_last_layer`` freezes the weight-norm gain at 1, which the paper found stabilising for ViT-S.
    Input ``(batch_size, in_dim)``, output ``(batch_size, out_dim)`` logits.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for i in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden_dim, hidden_dim if i < nlayers - 2 else bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of several resolutions.

    Crops of equal size are concatenated and go through the backbone in one pass (as the official
    ``MultiCropWrapper``); the head then sees all CLS features at once. Output rows are crop-major:
    ``(len(crops) * batch_size, out_dim)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))
