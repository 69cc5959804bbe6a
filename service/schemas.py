"""Request and response bodies of the HTTP API (DESIGN.md, contract 2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="The image file (JPEG, PNG, WebP, ...) encoded as base64.")


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
