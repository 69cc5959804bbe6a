"""Image intake: bytes → RGB picture → normalised tensor, following the model card.

The transform reproduces torchvision's ``Resize(resize, BICUBIC) → CenterCrop(crop) → ToTensor →
Normalize(mean, std)`` on PIL images (the DINO evaluation transform, ``eval_knn.py``) bit for bit, with
NumPy and Pillow only, so the gateway needs no torch. By default every image takes that exact path (issue 19):
the served embedding is the official pipeline's for every size and format. The one difference from the
official loader is on purpose: EXIF orientation is applied (the official ``ImageFolder`` loader ignores it,
so a phone photo taken upright reaches the model lying on its side there).

What is accepted (issue 7): JPEG (and MPO, the multi-picture JPEG of phone cameras), PNG, WebP, BMP, GIF and
TIFF, recognised by their content, never by a file name or a declared content type; the first frame of an
animation or the first page of a TIFF. Every pixel mode becomes 8-bit RGB (``to_rgb``): transparency is
composited over white, 16-bit greys are rescaled (not clipped), float greys are read as 0 to 1.

Lossy speed only when asked: with ``draft_margin`` > 0 (the gateway's ``jpeg_draft_margin``, 0 by default) a
JPEG is decoded at a reduced scale when the model input is much smaller (libjpeg's DCT scaling, Pillow
``draft``): the shorter side stays at least ``draft_margin`` times the card's resize, and one resize of the
region that survives the centre crop follows. Those pixels are not the official pipeline's: how far the
tensor and the embeddings move, and how much intake work it saves, is measured in ``docs/benchmarks.md``
("Intake").
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from core.model_card import Preprocess
from core.transform import RESAMPLE, center_crop_box, normalize, preprocess, resized_size

from .errors import bad_request, too_large, unsupported_media

# Pillow's format names. MPO is how Pillow names a JPEG that carries extra pictures (phone cameras): its
# first picture is an ordinary JPEG.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_JPEG_FORMATS = ("JPEG", "MPO")
# Transparent pixels are composited over this colour: most transparent pictures on the web (logos, product
# cut-outs, icons) are drawn to be seen on a light page.
ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Resizing a whole picture costs its resized area: past this many crops' worth (an aspect ratio past ~12:1),
# only the crop's region is resized, approximately (a legal 20000x1 strip would otherwise become
# 5 120 000 x 256 pixels before the crop).
_MAX_RESIZED_AREA = 16


def _signature(data: bytes) -> str | None:
    """The allowed format whose signature (Pillow's own test of the first bytes) ``data`` starts with."""
    for fmt in ALLOWED_FORMATS:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is not None and accept(data[:16]):
            return fmt
    return None


def _corrupt(exc: Exception):
    return bad_request(f"corrupt or truncated image: {exc}", code="invalid_image")


def open_image(data: bytes, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Identify an uploaded image from its header, decoding no pixel yet.

    Raises ``ApiError``: 400 for an empty or malformed file, 413 over ``max_bytes`` bytes or over
    ``max_pixels`` pixels by the header (a decompression bomb is refused before it expands), 415 when the
    content is not one of ``ALLOWED_FORMATS``. Pillow's own bomb guard (twice ``Image.MAX_IMAGE_PIXELS``)
    also answers 413.
    """
    if not data:
        raise bad_request("empty image", code="invalid_image")
    if max_bytes is not None and len(data) > max_bytes:
        raise too_large(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        claimed = _signature(data)
        if claimed is not None:  # it starts like an allowed format, yet no header parses: cut short or broken
            raise bad_request(f"corrupt or truncated {claimed} image", code="invalid_image") from None
        raise unsupported_media(f"not a recognised image format; allowed: {', '.join(ALLOWED_FORMATS)}") from None
    except Image.DecompressionBombError as exc:
        raise too_large(str(exc)) from None
    except Exception as exc:  # Pillow's parsers raise many types on a malformed header; each is the file's fault
        raise _corrupt(exc) from None
    if img.format not in ALLOWED_FORMATS:
        raise unsupported_media(f"image format {img.format} is not accepted; allowed: {', '.join(ALLOWED_FORMATS)}")
    width, height = img.size
    if width < 1 or height < 1:
        raise bad_request(f"image header says {width}x{height} pixels", code="invalid_image")
    if width * height > max_pixels:
        raise too_large(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return img


def _load_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image, apply its EXIF orientation, convert to RGB (400 when corrupt)."""
    try:
        img.load()
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even an upright one
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise too_large(str(exc)) from None
    except Exception as exc:  # truncation and corruption surface here as OSError, SyntaxError, EOFError, ...
        raise _corrupt(exc) from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB.

    Alpha (RGBA, LA, PA, a palette or grey or RGB with a transparent colour) is composited over
    ``ALPHA_BACKGROUND`` (white). 16-bit greys (I;16*) are rescaled from 0-65535 to 0-255 with rounding; 32-bit
    integer greys (mode I: TIFFs of wider samples; older Pillow opened 16-bit PNGs so too) are read on the
    same 16-bit scale, clipped to it; float greys (mode F) are read as 0.0 (black) to 1.0 (white), clipped.
    1-bit, grey, palette, CMYK, YCbCr and LAB go through Pillow's conversion.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        grey = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        grey = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0.0, 1.0)
        return Image.fromarray(np.rint(grey * 255).astype(np.uint8)).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        background = Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise unsupported_media(f"pixel mode {img.mode} is not supported") from None


def decode_image(data: bytes, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Decode one uploaded image at full resolution to RGB with EXIF orientation applied.

    Raises ``ApiError`` as ``open_image`` does, and 400 when the pixel data is truncated or corrupt.
    """
    return _load_rgb(open_image(data, max_pixels, max_bytes))


@dataclass(frozen=True)
class Decoded:
    """An RGB picture decoded for the embedding transform: at full resolution unless a reduced-scale JPEG
    decode was asked for.

    ``full_size`` is its (width, height) at full resolution after EXIF orientation; ``scale`` how many
    full-resolution pixels one decoded pixel spans (1, 2, 4 or 8; libjpeg rounds the decoded size up).
    """

    image: Image.Image
    full_size: tuple[int, int]
    scale: int


def decode_for_embedding(data: bytes, spec: Preprocess, max_pixels: int, max_bytes: int | None = None,
                         draft_margin: int = 0) -> Decoded:
    """Decode for ``embedding_input``: at full size (``draft_margin`` 0, the default: the official pipeline's
    pixels), or, when asked, a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side is still at
    least ``draft_margin`` x ``spec.resize``; other formats are always decoded at full size.

    Errors as ``decode_image``; the pixel limit applies to the full size in the header.
    """
    img = open_image(data, max_pixels, max_bytes)
    width, height = img.size
    scale = 1
    if draft_margin > 0 and img.format in _JPEG_FORMATS:
        drafted = img.draft("RGB", resized_size(width, height, draft_margin * spec.resize))
        if drafted is not None:  # None: not a single-scan baseline layout Pillow can scale
            scale = round(width / drafted[1][2])
    rgb = _load_rgb(img)  # after this the EXIF block is known to parse
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # exif_transpose turned it a quarter
        width, height = height, width
    return Decoded(rgb, (width, height), scale)


def embedding_input(decoded: Decoded, spec: Preprocess) -> np.ndarray:
    """float32 ``[3, crop, crop]``: ``preprocess``, the official transform bit for bit, for a full-scale
    picture. Approximate in two cases: a reduced-scale decode (asked for with ``draft_margin``), and a picture
    whose resized whole would be huge (an aspect ratio past ~12:1), where one resize of just the region that
    DINO's Resize → CenterCrop of the full picture keeps is made (same sampling positions; Pillow takes the
    box as 32-bit floats, so its filter weights differ in the last bits and rare pixels by one level)."""
    width, height = decoded.full_size
    resized = resized_size(width, height, spec.resize)
    if decoded.scale == 1 and resized[0] * resized[1] <= _MAX_RESIZED_AREA * spec.crop ** 2:
        return preprocess(decoded.image, spec)
    left, top, right, bottom = center_crop_box(*resized, spec.crop)
    sx = width / resized[0] / decoded.scale  # resized → decoded pixels
    sy = height / resized[1] / decoded.scale
    img = decoded.image.resize((spec.crop, spec.crop), RESAMPLE[spec.interpolation],
                               box=(left * sx, top * sy, right * sx, bottom * sy))
    return normalize(np.asarray(img), spec)
