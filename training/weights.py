"""Backbone weights from every checkpoint shape ``dinoserve export`` accepts, read safely.

Accepted (each is reduced to one prefix-free ViT state dict and a :class:`BackboneSpec` read from it):

- our own ``checkpoint.pth`` / ``teacher_backbone.pth`` (``format`` key; spec stored in the file);
- official DINO and iBOT full training checkpoints: ``student`` / ``teacher`` state dicts with
  ``module.`` (DDP) and ``backbone.`` (``MultiCropWrapper``) prefixes, ``head.*`` projection-head keys,
  an optimizer, the loss state and a pickled ``argparse.Namespace`` of arguments;
- official iBOT releases ``{"state_dict": {...}}`` (iBOT's ``extract_backbone_weights.py``) and the
  official DINO releases, a bare backbone state dict (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ..., ``norm.weight``);
- timm ViT state dicts, as ``.pth`` or ``.safetensors`` (register tokens, layer scale and position
  embeddings without a CLS entry are read from the keys).

Unpickling runs code, so ``.pth`` files are read with ``torch.load(weights_only=True)``, which allows
tensors and builtins only; the one extra type allowed is ``argparse.Namespace``, the ``args`` of the
official full checkpoints. A file needing anything else is refused, never loaded.

Position embeddings of official-layout weights, ours included (we train with the official rule), are
interpolated as the official code does (``official_vit.py``); timm-layout weights keep timm's resample.
The choice is made here and recorded in the model card.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoint import BACKBONE_FORMAT, FULL_FORMAT
from .models import ARCHS, BackboneSpec, build_backbone
from .official_vit import OfficialViT

log = logging.getLogger(__name__)

SAFE_GLOBALS = [argparse.Namespace]  # the official full checkpoints pickle their argparse arguments
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16}  # ViT-Ti/S/B/L, 64-dim heads
CHECKPOINT_KEYS = ("teacher", "student")
INTERPOLATIONS = ("official", "timm")
# Keys that belong to training, not to the backbone served: projection heads / classifiers and iBOT's
# learnable mask token (inference never masks).
DROPPED_PREFIXES = ("head.", "masked_embed")


class CheckpointError(ValueError):
    """A file that cannot be exported; the message is one line saying why."""


@dataclass(frozen=True)
class ImportedSpec(BackboneSpec):
    """A :class:`BackboneSpec` read from foreign weights, with the layout details timm can express."""

    reg_tokens: int = 0  # register tokens after CLS (Darcet et al., "Vision Transformers Need Registers")
    no_embed_class: bool = False  # position embeddings cover the patches only (timm's DeiT-3 layout)
    layer_scale: bool = False  # per-channel residual gains (timm ``ls1.gamma``, iBOT ``gamma_1``)
    pos_interpolation: str = "official"  # "official" (DINO/iBOT code) or "timm"


@dataclass(frozen=True)
class LoadedBackbone:
    """What export needs from a checkpoint."""

    spec: BackboneSpec
    weights: dict[str, torch.Tensor]
    method: str  # "dino", "ibot", or "unknown" (timm weights say nothing about how they were trained)
    source_format: str  # which of the accepted shapes the file had
    checkpoint_key: str | None  # "teacher" / "student" where the file held both

    @property
    def pos_interpolation(self) -> str:
        """Our own backbones (``BackboneSpec``) are trained and served with the official rule."""
        return getattr(self.spec, "pos_interpolation", "official")


def read_file(path: Path) -> object:
    """The object stored in a ``.pth`` / ``.safetensors`` file, unpickled with the safe loader only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(error)})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"the Python object {found.group(1)}" if found else "Python objects"
        raise CheckpointError(
            f"{path} refused: it needs {what}, and unpickling it could run arbitrary code; only tensors, "
            "builtins and argparse.Namespace are loaded") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint, truncated or not written by torch.save "
                              f"({_first_line(error) or type(error).__name__})") from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().split("\n")[0][:200]


def load_checkpoint(path: Path, checkpoint_key: str = "teacher", num_heads: int | None = None,
                    pos_interpolation: str | None = None) -> LoadedBackbone:
    """Read ``path`` (any accepted shape) into a backbone spec and its prefix-free weights.

    ``checkpoint_key`` picks the network of files holding both (the papers report the teacher);
    ``num_heads`` overrides the standard heads of the embedding width; ``pos_interpolation``
    (``"official"`` or ``"timm"``) overrides the interpolation the file's layout implies.
    """
    path = Path(path)
    if checkpoint_key not in CHECKPOINT_KEYS:
        raise CheckpointError(f"checkpoint key must be one of {', '.join(CHECKPOINT_KEYS)}, got {checkpoint_key!r}")
    if pos_interpolation not in (None, *INTERPOLATIONS):
        raise CheckpointError(f"pos_interpolation must be one of {', '.join(INTERPOLATIONS)}")
    obj = read_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")

    if obj.get("format") in (FULL_FORMAT, BACKBONE_FORMAT):
        return _load_own(path, obj, checkpoint_key)

    used_key = None
    if any(k in obj for k in CHECKPOINT_KEYS):
        if not isinstance(obj.get(checkpoint_key), dict):
            held = [k for k in CHECKPOINT_KEYS if k in obj]
            raise CheckpointError(f"{path} has no {checkpoint_key!r} weights (it holds {', '.join(held)})")
        state, used_key = obj[checkpoint_key], checkpoint_key
        method = "ibot" if "ibot_loss" in obj else "dino" if "dino_loss" in obj else None
        source_format = "official-full-checkpoint"
    elif isinstance(obj.get("state_dict"), dict):
        state, method, source_format = obj["state_dict"], "ibot", "ibot-state-dict"
    else:
        state, method = obj, None
        source_format = "safetensors" if path.suffix == ".safetensors" else "state-dict"

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        others = sorted(k for k in state if k not in tensors)
        raise CheckpointError(f"{path} is not a state dict: {_listing(others)} are not tensors")
    weights = remap_keys(tensors)
    timm_layout = looks_like_timm(weights, tensors) or path.suffix == ".safetensors"
    interpolation = pos_interpolation or ("timm" if timm_layout else "official")
    if method is None:
        masked = any(k.endswith("masked_embed") for k in tensors)
        method = "ibot" if masked else "unknown" if timm_layout else "dino"
    spec = infer_spec(weights, num_heads, interpolation, path)
    return LoadedBackbone(spec, weights, method, source_format, used_key)


def _load_own(path: Path, state: dict, checkpoint_key: str) -> LoadedBackbone:
    """Our own checkpoints carry their spec; weights as trained (official position-embedding rule)."""
    if state["format"] == BACKBONE_FORMAT:
        weights, used_key = state["state_dict"], None
    else:
        if checkpoint_key not in state:
            raise CheckpointError(f"{path} has no {checkpoint_key!r} weights; choose 'teacher' or 'student'")
        weights, used_key = remap_keys(state[checkpoint_key]), checkpoint_key
    weights = {k: v for k, v in weights.items() if not k.startswith(DROPPED_PREFIXES)}
    spec = BackboneSpec(**{**state["backbone"], "drop_path_rate": 0.0})
    return LoadedBackbone(spec, weights, state["method"], state["format"], used_key)


def remap_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official / iBOT / wrapped keys → timm ``VisionTransformer`` keys.

    Strips ``module.`` (DistributedDataParallel) and ``backbone.`` (``MultiCropWrapper``), drops the
    projection head and iBOT's mask token, and renames iBOT's layer scale ``blocks.i.gamma_1`` /
    ``gamma_2`` to timm's ``blocks.i.ls1.gamma`` / ``ls2.gamma``. Official ViT keys are timm's already.
    """
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key.startswith(DROPPED_PREFIXES):
            continue
        key = re.sub(r"^(blocks\.\d+\.)gamma_([12])$", r"\1ls\2.gamma", key)
        out[key] = value
    return out


def looks_like_timm(weights: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> bool:
    """Weights whose layout the official DINO/iBOT ViT cannot hold: register tokens, timm layer scale,
    a classifier head or ``fc_norm`` (timm), or position embeddings without a CLS entry."""
    if "reg_token" in weights or any(k.endswith(".ls1.gamma") for k in original):
        return True
    if "head.weight" in original or "fc_norm.weight" in original:
        return True
    pos = weights.get("pos_embed")
    return pos is not None and pos.ndim == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]


def infer_spec(weights: dict[str, torch.Tensor], num_heads: int | None, pos_interpolation: str,
               source: Path) -> ImportedSpec:
    """Patch size, width, depth, position grid, prefix tokens and layer scale from the tensors."""
    proj = weights.get("patch_embed.proj.weight")
    pos = weights.get("pos_embed")
    if proj is None or pos is None or "blocks.0.attn.qkv.weight" not in weights:
        core = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "norm.weight")
        missing = [k for k in core if k not in weights]
        raise CheckpointError(f"{source} does not hold a ViT backbone: missing {_listing(missing)}; "
                              f"unexpected {_listing(sorted(weights))}")
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected "
                              "(dim, 3, patch, patch)")
    embed_dim, patch = proj.shape[0], proj.shape[2]
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in weights:
        depth += 1
    heads = num_heads or STANDARD_HEADS.get(embed_dim)
    if heads is None:
        raise CheckpointError(f"{source}: embedding width {embed_dim} has no standard head count "
                              f"({', '.join(f'{d}→{h}' for d, h in STANDARD_HEADS.items())}); pass --num-heads")
    if embed_dim % heads:
        raise CheckpointError(f"{source}: {heads} heads do not divide the embedding width {embed_dim}")

    class_token = "cls_token" in weights
    if not class_token:
        raise CheckpointError(f"{source} has no cls_token: dinoserve serves the CLS embedding")
    reg_tokens = weights["reg_token"].shape[1] if "reg_token" in weights else 0
    positions = pos.shape[1]
    prefix = 1 + reg_tokens
    if positions > prefix and math.isqrt(positions - prefix) ** 2 == positions - prefix:
        grid, no_embed_class = math.isqrt(positions - prefix), False
    elif math.isqrt(positions) ** 2 == positions:
        grid, no_embed_class = math.isqrt(positions), True
    else:
        raise CheckpointError(f"{source}: pos_embed has {positions} positions, not a square grid of patches "
                              f"(with or without {prefix} prefix tokens)")
    if pos_interpolation == "official" and (reg_tokens or no_embed_class):
        raise CheckpointError(f"{source}: the official interpolation needs the official layout (a CLS "
                              "position, no register tokens); use the timm interpolation")
    layer_scale = "blocks.0.ls1.gamma" in weights
    arch = next((name for name, dims in ARCHS.items() if dims == (embed_dim, depth, heads)), "vit_custom")
    return ImportedSpec(arch, patch, embed_dim, depth, heads, img_size=grid * patch, reg_tokens=reg_tokens,
                        no_embed_class=no_embed_class, layer_scale=layer_scale,
                        pos_interpolation=pos_interpolation)


def build_vit(spec: BackboneSpec) -> nn.Module:
    """The timm ViT of ``spec``: ours through ``build_backbone``, imported ones with their layout."""
    if not isinstance(spec, ImportedSpec):
        return build_backbone(spec)
    vit_class = OfficialViT if spec.pos_interpolation == "official" else VisionTransformer
    return vit_class(
        img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
        num_heads=spec.num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token",
        dynamic_img_size=True, reg_tokens=spec.reg_tokens, no_embed_class=spec.no_embed_class,
        init_values=1.0 if spec.layer_scale else None,
    )


def fit_weights(spec: BackboneSpec, weights: dict[str, torch.Tensor], source: str) -> nn.Module:
    """``spec``'s ViT with ``weights`` loaded, in eval mode; a one-line error naming what does not fit."""
    vit = build_vit(spec)
    expected = vit.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(f"{k} {tuple(weights[k].shape)}≠{tuple(expected[k].shape)}"
                   for k in set(expected) & set(weights) if weights[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label} {_listing(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{source} does not fit a {spec.arch} (dim {spec.embed_dim}, depth {spec.depth}, "
                              f"patch {spec.patch_size}): {'; '.join(parts)}")
    vit.load_state_dict(weights)
    return vit.eval()


def _listing(keys: list[str], shown: int = 6) -> str:
    if not keys:
        return "nothing"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
