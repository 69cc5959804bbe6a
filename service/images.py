"""Image intake: bytes → RGB picture → normalised tensor, following the model card.

The transform reproduces torchvision's ``Resize(resize, BICUBIC) → CenterCrop(crop) → ToTensor →
Normalize(mean, std)`` on PIL images (the DINO evaluation transform, ``eval_knn.py``) bit for bit, with
NumPy and Pillow only, so the gateway needs no torch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import bad_request, too_large, unsupported_media
from .model_card import Preprocess

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode one uploaded image to RGB with EXIF orientation applied.

    Raises ``ApiError``: 415 when the bytes are not an image format Pillow knows, 413 when the header
    announces more than ``max_pixels`` pixels (checked before any pixel is decoded), 400 when the file is
    truncated or corrupt.
    """
    if not data:
        raise bad_request("empty image", code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise unsupported_media("not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large(f"image has more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError) as exc:  # a header cut short or malformed
        raise bad_request(f"corrupt or truncated image: {exc}", code="invalid_image") from None
    width, height = img.size
    if width * height > max_pixels:
        raise too_large(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow reports truncation and corruption so
        raise bad_request(f"corrupt or truncated image: {exc}", code="invalid_image") from None


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
    """RGB picture → float32 ``[3, crop, crop]`` normalised array, as DINO's evaluation transform."""
    resample = _RESAMPLE[spec.interpolation]
    img = img.resize(resized_size(*img.size, spec.resize), resample)
    img = img.crop(center_crop_box(*img.size, spec.crop))
    return normalize(np.asarray(img), spec)


def normalize(rgb: np.ndarray, spec: Preprocess) -> np.ndarray:
    """uint8 ``[H, W, 3]`` → float32 ``[3, H, W]``: scale to [0, 1], subtract mean, divide by std."""
    x = rgb.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std)
