"""Request and response bodies of the HTTP API (the contract: docs/api.md)."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .errors import bad_request


# One image of a request: base64 ``data`` in JSON; in multipart a file part, made by ``upload``. (A comment,
# not a docstring: pydantic would put a docstring into the API schema.)
class ImageData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="The image file (JPEG, PNG, WebP, ...) encoded as base64.")
    _content: bytes | None = PrivateAttr(None)

    @classmethod
    def upload(cls, content: bytes) -> "ImageData":
        """The image of a multipart file part: its bytes as they came, with no base64 text (``data`` unset).
        Validation keeps the instance as it is, so the request model holds it like a JSON image."""
        image = cls.model_construct()
        image._content = content
        return image

    def decode(self, where: str) -> bytes:
        """The image file's bytes; 400 ``invalid_base64`` naming ``where`` (the field) when ``data`` is not
        base64. Decoded once."""
        if self._content is None:
            try:
                self._content = base64.b64decode(self.data, validate=True)
            except (binascii.Error, ValueError):
                raise bad_request(f"{where} is not valid base64", code="invalid_base64") from None
        return self._content

    @property
    def content(self) -> bytes:
        """The image file's bytes, once :meth:`decode` has run (the request reader runs it on every image)."""
        if self._content is None:
            raise RuntimeError("the image is not decoded yet: read requests with request_body.read_request")
        return self._content


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[ImageData] = Field(min_length=1, description="One or more images.")
    normalize: bool = Field(False, description="L2-normalise each embedding (cosine-ready).")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'base64': each embedding as base64 of little-endian float32 bytes."
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    dim: int
    data: list[Embedding]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class SegmentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_mass: float = Field(
        0.6, gt=0, le=1,
        description="Fraction of each attention map's mass the mask keeps (DINO's threshold; 0.6 in its paper).",
    )
    size: int | None = Field(
        None,
        description="Shorter side of the model input in pixels, from the patch size to 1024, rounded down "
                    "to the patch size; default from the model card (480). Larger: finer masks, more cost.",
    )
    method: Literal["mean", "union", "head", "tokencut"] = Field(
        "mean", description="'mean' thresholds the heads' mean attention; 'union' keeps any head's patches; "
                            "'head' is one head's mask (see `head`); 'tokencut' is a normalised cut of the patch "
                            "features (TokenCut), the part holding the most salient patch.",
    )
    head: int = Field(
        0, ge=0, description="Head for method 'head', from 0. DINO reports a model's best head; "
                             "bench/segmentation.py finds it on held-out images.",
    )
    outputs: list[Literal["mask_png", "rle", "grid", "heads", "overlay"]] = Field(
        default_factory=lambda: ["mask_png", "grid"],
        description="What to return; each costs only when asked for. In multipart, comma-separated.",
    )


class SegmentRequest(SegmentOptions):
    image: ImageData = Field(description="One image.")


class RunLengthEncoding(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: list[int] = Field(description="COCO uncompressed RLE: column-major runs, starting with zeros.")


class SegmentResponse(BaseModel):
    width: int = Field(description="Width of the image (after EXIF orientation); masks have this size.")
    height: int
    input_size: list[int] = Field(description="[width, height] of the model input.")
    grid: list[int] = Field(description="[h, w]: the patch grid.")
    heads: int
    keep_mass: float
    method: str
    head: int | None = Field(None, description="The head used, for method 'head'.")
    mask_png: str | None = Field(None, description="Foreground mask, base64 PNG (mode L, 0 or 255), image size.")
    rle: RunLengthEncoding | None = None
    grid_mask: list[list[int]] | None = Field(None, description="Foreground mask on the patch grid, [h][w] of 0/1.")
    grid_masks: list[list[list[int]]] | None = Field(None, description="Each head's mask, [heads][h][w] of 0/1.")
    heads_png: list[str] | None = Field(None, description="Each head's attention heatmap, base64 PNG, image size.")
    overlay_png: str | None = Field(None, description="Heatmap and mask contour over the photo, base64 PNG.")
