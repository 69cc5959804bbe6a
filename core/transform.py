"""The embedding transform, DINO's evaluation transform (official ``eval_knn.py``): torchvision's
``Resize(resize, BICUBIC) → CenterCrop(crop) → ToTensor → Normalize(mean, std)`` on PIL images, bit for bit,
with NumPy and Pillow only. The gateway's intake (``service/images.py``) and the trainer's evaluation of a
bundle (``training/evaluate.py``) both use it, so both see the pixels the official pipeline sees.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from .model_card import Preprocess

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """Output (width, height) of torchvision ``Resize(shorter)``: the long side is truncated, not rounded."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision ``CenterCrop(crop)``, which rounds the offsets."""
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def preprocess(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB picture → float32 ``[3, crop, crop]`` normalised array, bit-identical to DINO's evaluation transform
    (torchvision ``Resize`` → ``CenterCrop`` → ``ToTensor`` → ``Normalize``; ``tests/test_images.py``).

    The whole picture is resized, as torchvision does, then cropped. Resizing only the crop's region (Pillow's
    ``box``) is not the same: Pillow takes the box as 32-bit floats, so the filter's scale and centres, and
    with them its fixed-point weights, differ from the whole resize's in the last bits, and some pixels by
    one level. Giving each of Pillow's two passes only the rows or columns the crop needs would keep the
    weights, but which pass runs first is Pillow's own choice per geometry (Pillow 13 resizes many tall
    pictures vertically first), and it saves little (docs/benchmarks.md, "Intake").
    """
    resample = RESAMPLE[spec.interpolation]
    img = img.resize(resized_size(*img.size, spec.resize), resample)
    left, top, right, bottom = center_crop_box(*img.size, spec.crop)
    return normalize(np.asarray(img)[top:bottom, left:right], spec)


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 ``[3, 256]``: every 8-bit level of each channel put through torchvision's ``ToTensor`` then
    ``Normalize`` (scale to [0, 1], subtract the mean, divide by the std, each step in float32)."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    return (levels[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]


def normalize(rgb: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 ``[H, W, 3]`` → float32 ``[3, H, W]``, bit-identical to torchvision's ``ToTensor`` + ``Normalize``:
    a 256-entry table per channel holds that arithmetic for each level, so a pixel costs one lookup, written
    straight into its plane of the output (faster than the whole-array arithmetic or per-channel fancy
    indexing + stack: docs/benchmarks.md, "Serving")."""
    table = _normalize_table(tuple(spec.mean), tuple(spec.std))
    height, width = rgb.shape[:2]
    out = np.empty((3, height, width), dtype=np.float32)
    for c in range(3):
        np.take(table[c], rgb[..., c], out=out[c])
    return out
