"""ViT backbones (built with timm) and the DINO projection head, numerically the official ones.

Backbones are timm ``VisionTransformer``s with a CLS token, no classifier and ``dynamic_img_size`` so
one model takes global and local crops and any inference size. Where timm and the official
``vision_transformer.py`` of facebookresearch/dino (iBOT's is the same) compute differently, ours follows
the official code, in training as in export:

- position embeddings for a non-native patch grid are resized by the official ``interpolate_pos_encoding``
  (bicubic with the ``+ 0.1`` ``scale_factor``, no antialias; ``official_vit.py``), not timm's resample;
- attention is the official explicit softmax, ``softmax((q @ kᵀ) · scale) @ v``;
- stochastic depth draws ``keep + U[0, 1)`` and floors it, as the official ``drop_path`` (same random
  numbers, same order);
- initialisation is the official ``VisionTransformer.__init__``: ``pos_embed`` and ``cls_token``
  truncated-normal (std 0.02), Linear layers truncated-normal with zero bias, LayerNorm (1, 0), the patch
  projection with PyTorch's default.

``BackboneSpec.stem = "conv"`` (not in the official code) replaces the patch projection by a convolutional
stem of the same total stride (Xiao et al., *Early Convolutions Help Transformers See Better*, NeurIPS 2021):
log2(patch) 3×3 stride-2 convolutions with BatchNorm and ReLU, then a 1×1 projection to the embedding width.
It lives in ``patch_embed.proj``, so the token grid, the position embeddings and their interpolation, the
exported graph and the bundle's outputs are those of the patch stem; only the first layer's weights differ.
``stem = "edges"`` puts a fixed, colour-blind edge map (:class:`EdgeMap`, no parameters) in front of that stem.

The head follows the official ``vision_transformer.DINOHead``; its last layer keeps the official
``weight_g`` / ``weight_v`` keys (in that order) so checkpoints and optimizer states map one to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import check_stem
from .official_vit import OfficialViT

# name -> (embed_dim, depth, num_heads); the official sizes plus small ones for CPU work and tests.
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_pico": (48, 2, 3),
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
    # How pixels become tokens (``config.STEMS``): "patch", the official non-overlapping patch projection, or
    # "conv", a convolutional stem of the same stride (``conv_stem``), or "edges", that stem behind a fixed
    # edge map (``edge_stem``). Checkpoints written before the field existed load as "patch".
    stem: str = "patch"

    def __post_init__(self):
        check_stem(self.stem, self.patch_size)

    @classmethod
    def from_arch(cls, arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0,
                  stem: str = "patch"):
        """A named size (``ARCHS``) at ``patch_size``, or a timm ViT name such as
        ``vit_small_patch16_224`` whose patch size and image size come from the name."""
        if arch in ARCHS:
            embed_dim, depth, num_heads = ARCHS[arch]
            return cls(arch, patch_size, embed_dim, depth, num_heads, img_size, drop_path_rate, stem)
        spec = cls._from_timm(arch, drop_path_rate)
        return replace(spec, stem=stem) if stem != spec.stem else spec

    @classmethod
    def _from_timm(cls, name: str, drop_path_rate: float) -> "BackboneSpec":
        import timm

        if name not in timm.list_models():
            raise ValueError(f"unknown arch {name!r}: choose one of {', '.join(ARCHS)} or a timm ViT name "
                             "such as vit_small_patch16_224")
        model = timm.create_model(name, pretrained=False, num_classes=0)
        if not isinstance(model, VisionTransformer):
            raise ValueError(f"timm model {name!r} is not a VisionTransformer")
        spec = cls(name, model.patch_embed.patch_size[0], model.embed_dim, len(model.blocks),
                   model.blocks[0].attn.num_heads, model.patch_embed.img_size[0], drop_path_rate)
        ours = {k: v.shape for k, v in build_backbone(spec).state_dict().items()}
        theirs = {k: v.shape for k, v in model.state_dict().items()}
        if ours != theirs:
            differing = sorted(set(ours.items()) ^ set(theirs.items()))[:4]
            raise ValueError(f"timm model {name!r} is not a plain ViT (class token, MLP ratio 4, qkv bias, "
                             f"no register tokens or layer scale); differing parameters: {differing}")
        return spec

    def to_dict(self) -> dict:
        return asdict(self)


def conv_stem(patch_size: int, embed_dim: int) -> nn.Sequential:
    """Stride-``patch_size`` stem (Xiao et al., 2021): log2(patch_size) 3×3 stride-2 convolutions (padding 1,
    no bias) each followed by BatchNorm and ReLU, channels doubling up to ``embed_dim / 2`` (at least 16),
    then a 1×1 convolution (with bias) to ``embed_dim``. An input side divisible by ``patch_size`` gives
    side / patch_size tokens, as the patch projection. Initialisation: PyTorch's defaults (convolutions
    Kaiming-uniform, BatchNorm weight 1 and bias 0)."""
    check_stem("conv", patch_size)
    steps = patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    channels = 3
    for i in range(steps):
        out = max(16, embed_dim // 2 >> (steps - 1 - i))
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, embed_dim, 1))


class EdgeMap(nn.Module):
    """A fixed, colour-blind view of the (normalised) image, three channels at full resolution: per pixel
    the 3×3 Sobel derivatives of each colour channel (edge-replicated border) combined over the channels as
    ``|∂x| = √Σc ∂x_c²``, ``|∂y| = √Σc ∂y_c²`` and the magnitude ``√(|∂x|² + |∂y|²)``, all divided by the
    image's mean magnitude plus ``floor``. A flat shape gives the same map, up to that one scale, in any two
    colours of either polarity. DeepCluster (Caron et al., 2018) put a fixed Sobel filter in front of its
    network for the same reason: to take colour away as a shortcut; the division removes the contrast as
    well, and ``floor`` keeps a crop without edges from amplifying its pixel noise (docs/training.md)."""

    def __init__(self, floor: float = 0.5):
        super().__init__()
        self.floor = floor
        sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([sobel_x, sobel_x.t()])[:, None].repeat(3, 1, 1, 1)  # (c, direction) pairs
        self.register_buffer("kernels", kernels, persistent=False)  # not a weight: checkpoints do not carry it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grads = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.kernels.to(x.dtype), groups=3)
        squares = grads.unflatten(1, (3, 2)).pow(2).sum(1)  # (batch, direction, h, w), summed over colour
        dx, dy = squares[:, :1].add(1e-6).sqrt(), squares[:, 1:].add(1e-6).sqrt()
        magnitude = (dx.pow(2) + dy.pow(2)).sqrt()
        scale = magnitude.mean(dim=(2, 3), keepdim=True) + self.floor
        return torch.cat([dx, dy, magnitude], 1) / scale


def edge_stem(patch_size: int, embed_dim: int) -> nn.Sequential:
    """:class:`EdgeMap` followed by :func:`conv_stem`: the token grid and weights of the convolutional stem
    (its layers are numbered from 1), fed edges instead of colours."""
    return nn.Sequential(EdgeMap(), *conv_stem(patch_size, embed_dim))


class OfficialAttention(Attention):
    """timm's attention module (same parameters) computing the official ``Attention.forward``:
    ``softmax((q @ kᵀ) · scale) @ v`` with an explicit softmax, in the official order of operations."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(x))


class OfficialDropPath(nn.Module):
    """Stochastic depth as the official ``drop_path``: one ``U[0, 1)`` draw per sample, ``floor(keep + u)``
    as the mask, ``x / keep`` kept. Same random stream and numbers as the official student."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x.div(keep) * mask.floor_()


def official_init(module: nn.Module) -> None:
    """The official ``_init_weights``: Linear truncated-normal (std 0.02, cut at ±2) with zero bias,
    LayerNorm weight 1 and bias 0; other modules keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTBackbone(OfficialViT):
    """The official DINO/iBOT ViT as a timm ``VisionTransformer`` that can also return every token and
    replace masked patches.

    ``forward`` is timm's (final-norm CLS token). ``forward_tokens(x, mask)`` returns the final-norm
    tokens ``(batch, 1 + h*w, dim)``; with ``masked_im_modeling`` the patches where ``mask``
    ``(batch, h, w)`` is True are replaced by the learnable ``masked_embed`` before the position
    embedding is added, as iBOT's ``prepare_tokens`` does (same parameter name and shape as the official
    checkpoints). ``stem="conv"`` puts :func:`conv_stem` in ``patch_embed.proj``, ``stem="edges"``
    :func:`edge_stem`.
    """

    def __init__(self, *args, masked_im_modeling: bool = False, drop_path_rate: float = 0.0, stem: str = "patch",
                 **kwargs):
        super().__init__(*args, attn_layer=OfficialAttention, weight_init="skip", **kwargs)
        check_stem(stem, self.patch_embed.patch_size[0])
        if stem != "patch":
            make = conv_stem if stem == "conv" else edge_stem
            self.patch_embed.proj = make(self.patch_embed.patch_size[0], self.embed_dim)
        self.masked_embed = nn.Parameter(torch.zeros(1, self.embed_dim)) if masked_im_modeling else None
        # The official stochastic-depth rule, linear in depth: dpr_i = i · rate / (depth - 1).
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, len(self.blocks))]
        for block, rate in zip(self.blocks, rates):
            block.drop_path1, block.drop_path2 = OfficialDropPath(rate), OfficialDropPath(rate)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(official_init)

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x)  # (batch, h, w, dim) with dynamic_img_size
        if mask is not None:
            if self.masked_embed is None:
                raise ValueError("this backbone was built without masked_im_modeling; it takes no mask")
            x[mask] = self.masked_embed.to(x.dtype)  # in place, as iBOT's ``mask_model`` (same gradients)
        x = self._pos_embed(x)
        x = self.norm_pre(self.patch_drop(x))
        x = self.blocks(x)
        return self.norm(x)


def build_backbone(spec: BackboneSpec, masked_im_modeling: bool = False) -> ViTBackbone:
    """The official ViT of ``spec`` returning the final-norm CLS token (``num_classes=0``, token pooling);
    with ``spec.stem == "conv"`` its patch projection is :func:`conv_stem`, with ``"edges"`` :func:`edge_stem`."""
    return ViTBackbone(
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
        masked_im_modeling=masked_im_modeling,
        stem=spec.stem,
    )


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g · v / ‖v‖ per output row (Salimans & Kingma, 2016).

    Parameters are named like ``torch.nn.utils.weight_norm``'s (``weight_g``, ``weight_v``), the keys of
    the official DINO checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # As the official ``weight_norm(nn.Linear(in_dim, out_dim, bias=False))`` with ``weight_g`` filled
        # with 1: ``weight_v`` is nn.Linear's default initialisation, and ``weight_g`` is registered first.
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.nn.utils.weight_norm's own kernel: v · g / ‖v‖ per row, rounded as the official layer.
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0))


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


class IBOTHead(DINOHead):
    """iBOT's head (official ``models/head.py``, ``iBOTHead``): the DINO head's MLP applied to every
    token, CLS tokens projected onto ``out_dim`` prototypes (``last_layer``) and patch tokens onto
    ``patch_out_dim`` prototypes of their own (``last_layer2``), or onto the same ones with
    ``shared_head``. ``forward`` on ``(batch, in_dim)`` CLS features behaves as the DINO head.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        patch_out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        shared_head: bool = False,
    ):
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        if shared_head:
            if patch_out_dim != out_dim:
                raise ValueError(f"a shared head needs patch_out_dim == out_dim, got {patch_out_dim} and {out_dim}")
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim)
            if norm_last_layer:
                self.last_layer2.weight_g.requires_grad = False

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, 1 + patches, in_dim)`` → CLS logits ``(batch, out_dim)`` and patch logits
        ``(batch, patches, patch_out_dim)``."""
        x = F.normalize(self.mlp(tokens), dim=-1, p=2)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])


class MaskedMultiCropWrapper(nn.Module):
    """Backbone + iBOT head for one iBOT step (official ``MultiCropWrapper`` with ``return_all_tokens``).

    ``forward(global_crops, masks, local_crops)``: the global crops ``(ngcrops * batch, 3, H, W)``
    (crop-major) go through the backbone with their ``masks`` ``(ngcrops * batch, h, w)`` (None: nothing
    masked, the teacher's view) and give CLS and patch logits; the local crops (a list of equally sized
    batches, possibly empty) give CLS logits only. Returns ``(cls, patch, local_cls or None)``. One module
    call per step, so DistributedDataParallel sees every parameter used in ``forward``.

    As the official step, the local crops' tokens all go through the head's MLP and the CLS row is kept:
    the same numbers as the CLS alone, and the same rounding of the MLP's gradients as the official run.
    """

    def __init__(self, backbone: nn.Module, head: IBOTHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, global_crops: torch.Tensor, masks: torch.Tensor | None = None, local_crops: list[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cls, patch = self.head.forward_tokens(self.backbone.forward_tokens(global_crops, masks))
        local_cls = None
        if len(local_crops):
            tokens = F.normalize(self.head.mlp(self.backbone.forward_tokens(torch.cat(list(local_crops)))), dim=-1)
            local_cls = self.head.last_layer(tokens[:, 0])
        return cls, patch, local_cls


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
        return self.head(self.backbone_features(crops))

    def backbone_features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """CLS features of every crop, crop-major ``(len(crops) * batch_size, embed_dim)``."""
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return torch.cat(features)
