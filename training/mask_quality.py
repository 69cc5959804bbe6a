"""Foreground-mask quality of a ViT's attention on the synthetic shapes, whose exact object masks are known.

The masks come from the functions ``POST /v1/segment`` uses (``core.segmentation``), at the endpoint's
geometry (shorter side ``size``, masks back at the image size), from the attention and patch tokens of
the exported graph (``training.export.BundleGraph``, the module ``dinoserve export`` writes to ONNX);
each is scored by its IoU (Jaccard index) with the object's mask. Used by ``bench/segmentation.py`` and
``dinoserve bench-methods``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core.model_card import Preprocess
from core.segmentation import (
    attention_masks,
    grid_to_image,
    model_input_size,
    patch_mask,
    segmentation_input,
)

from .data import BACKGROUNDS, CLASSES, make_sample
from .export import BundleGraph

COMBINED = ("mean", "union", "tokencut")
AttentionModel = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(mask, truth).sum()
    return float(np.logical_and(mask, truth).sum() / union) if union else 1.0


def attention_model(vit: nn.Module) -> AttentionModel:
    """``pixel_values`` ``(3, H, W)`` → (``attention`` ``(heads, h*w)``, ``patch_tokens``) of a backbone,
    through the exported graph in PyTorch (onnxruntime agrees with it to ~1e-5)."""
    graph = BundleGraph(vit).eval()

    def model(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            _, attention, tokens = graph(torch.from_numpy(pixels)[None])
        return attention[0].numpy(), tokens[0].numpy()

    return model


def scores(model: AttentionModel, indices: range, seed: int, image_size: tuple[int, int], size: int,
           keep_mass: float, patch: int, desc: str, progress: bool = True,
           backgrounds: Sequence[str] = BACKGROUNDS, classes: Sequence[str] = CLASSES) -> dict[str, np.ndarray]:
    """IoU per image ``(len(indices),)`` for each combined method and ``(len(indices), heads)`` per head,
    on synthetic samples ``make_sample(index, image_size, seed, backgrounds, classes)``."""
    spec = Preprocess()  # the card's preprocessing: what `dinoserve export` writes
    out: dict[str, list] = {m: [] for m in (*COMBINED, "heads")}
    for index in tqdm(indices, desc=desc, unit="img", leave=False, disable=not progress):
        sample = make_sample(index, image_size, seed, backgrounds, classes)
        input_size = model_input_size(*sample.image.size, size, patch)
        attention, tokens = model(segmentation_input(sample.image, input_size, spec))
        grid = (input_size[1] // patch, input_size[0] // patch)

        def score(grid_mask: np.ndarray) -> float:
            return iou(grid_to_image(grid_mask, sample.image.size), sample.mask)

        for method in COMBINED:
            out[method].append(score(patch_mask(method, attention, grid, keep_mass, patch_tokens=tokens)))
        out["heads"].append([score(m) for m in attention_masks(attention, grid, keep_mass)])
    return {k: np.asarray(v) for k, v in out.items()}
