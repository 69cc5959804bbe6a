"""An independent PyTorch implementation of the official DINO / iBOT ViT forward pass, for tests.

Written from facebookresearch/dino ``vision_transformer.py`` (iBOT's ``models/vision_transformer.py`` is
the same for these parts): pre-norm blocks with LayerNorm(eps=1e-6), explicit softmax attention,
``interpolate_pos_encoding`` with the ``+ 0.1`` bicubic ``scale_factor``, embedding = CLS after the final
norm, attention = ``get_last_selfattention(x)[:, :, 0, 1:]``. Parameter names are the official ones, so
``state_dict()`` is an official backbone release file. No timm, no code of ours.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)

    def forward(self, x, return_attention=False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ReferenceViT(nn.Module):
    def __init__(self, patch_size=16, dim=192, depth=2, num_heads=3, img_size=224, masked_embed=False):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if masked_embed:  # iBOT's mask token (masked_im_modeling=True); unused without a mask
            self.masked_embed = nn.Parameter(torch.zeros(1, dim))

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size + 0.1
        h0 = h // self.patch_embed.patch_size + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, w, h)

    def forward(self, x):
        return self.tokens(x)[:, 0]

    def tokens(self, x):
        """All final-norm tokens (official ``get_intermediate_layers(x, n=1)[0]``)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def get_last_selfattention(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)


def make_official_vit(seed: int, masked_embed: bool = False, **kwargs) -> ReferenceViT:
    """A randomly initialised reference ViT with position embeddings and CLS token of trained-model
    magnitude (the official init, std 0.02, would make every interpolation look alike)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = ReferenceViT(masked_embed=masked_embed, **kwargs)
    with torch.no_grad():
        vit.pos_embed.copy_(0.5 * torch.randn(vit.pos_embed.shape, generator=generator))
        vit.cls_token.copy_(0.5 * torch.randn(vit.cls_token.shape, generator=generator))
        for name, param in vit.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
            if name.endswith("attn.qkv.weight"):
                param.mul_(3.0)  # peaked attention, as in trained models, not near-uniform rows
            if name == "masked_embed":
                param.copy_(torch.randn(param.shape, generator=generator))
    return vit.eval()


def dino_head_state(dim: int, seed: int, prefix: str) -> dict[str, torch.Tensor]:
    """Keys of the official ``DINOHead`` (3-layer MLP, weight-normalised last layer), small sizes."""
    g = torch.Generator().manual_seed(seed)
    hidden, bottleneck, out = 32, 16, 64
    shapes = {"mlp.0.weight": (hidden, dim), "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden),
              "mlp.2.bias": (hidden,), "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
              "last_layer.weight_g": (out, 1), "last_layer.weight_v": (out, bottleneck)}
    return {f"{prefix}head.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}


def official_args(**overrides) -> argparse.Namespace:
    """The pickled ``args`` of an official full checkpoint (a few of main_dino.py's arguments)."""
    args = dict(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, momentum_teacher=0.996,
                use_bn_in_head=False, teacher_temp=0.04, lr=0.0005, epochs=100, global_crops_scale=(0.4, 1.0),
                local_crops_number=8, data_path="/path/to/imagenet/train", output_dir=".", seed=0, gpu=0,
                dist_url="env://", rank=0, world_size=16)
    return argparse.Namespace(**{**args, **overrides})


def knn_top1(vit: torch.nn.Module, train_set, val_set, size: int, k: int = 20, temperature: float = 0.07) -> float:
    """DINO's weighted k-NN top-1 in percent (``eval_knn.py``: each of the k most cosine-similar train
    images votes exp(similarity / T) for its label), written here in NumPy on torchvision's evaluation
    transform at ``size`` (resize by 256 : 224, centre crop): the reference the bench's table must match."""
    transform = T.Compose([T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(size), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def features(dataset):
        with torch.no_grad():
            out = vit.eval()(torch.stack([transform(image) for image, _ in dataset])).numpy().astype(np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True), np.array([label for _, label in dataset])

    (train, train_labels), (val, val_labels) = features(train_set), features(val_set)
    similarity = val @ train.T
    votes = np.zeros((len(val), train_labels.max() + 1))
    for row, sims in enumerate(similarity):
        nearest = np.argsort(-sims)[:k]
        np.add.at(votes[row], train_labels[nearest], np.exp(sims[nearest] / temperature))
    return 100 * float(np.mean(votes.argmax(1) == val_labels))
