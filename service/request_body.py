"""Request bodies of the image endpoints: JSON (base64 images) or multipart (file parts), with the
size limits and error statuses of docs/api.md applied the same way everywhere."""

from __future__ import annotations

import base64
import binascii
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, bad_request, too_large, unsupported_media
from .schemas import ErrorResponse
from .settings import Settings

Model = TypeVar("Model", bound=BaseModel)

# OpenAPI: the error statuses every image endpoint may answer.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 429, 503, 504)}


def body_kind(request: Request, settings: Settings) -> str:
    """``"json"`` or ``"multipart"``; 413 when the declared length is over the limit, 415 otherwise."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_request_bytes:
        raise too_large(f"request body is {length} bytes; the limit is {settings.max_request_bytes}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return "multipart"
    if content_type in ("application/json", ""):
        return "json"
    raise unsupported_media(f"content type {content_type!r}: send application/json or multipart/form-data")


def validation_error(exc: ValidationError) -> ApiError:
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
    return ApiError(422, "validation_error", detail)


def validate(model: type[Model], values: dict) -> Model:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def read_json(request: Request, settings: Settings, model: type[Model]) -> Model:
    body = await request.body()
    if len(body) > settings.max_request_bytes:
        raise too_large(f"request body is larger than {settings.max_request_bytes} bytes")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def read_form(request: Request, max_files: int) -> FormData:
    """The multipart form; 413 past ``max_files`` file parts (Starlette's parser stops counting there), 400
    when malformed."""
    try:
        return await request.form(max_files=max_files)
    except (ApiError, ClientDisconnect):  # a client gone mid-body is not a malformed body
        raise
    except (HTTPException, MultiPartException) as exc:  # Starlette wraps its parser's errors in a 400
        detail = exc.detail if isinstance(exc, HTTPException) else exc.message
        if detail.startswith("Too many files"):
            raise too_large(f"the multipart body has more than {max_files} file parts") from None
        raise bad_request(f"malformed multipart body: {detail}") from None
    except Exception as exc:  # the multipart parser raises several types for malformed bodies
        raise bad_request(f"malformed multipart body: {exc}") from None


class BodySizeLimit:
    """ASGI middleware: 413 for a request body that grows past ``max_bytes`` as it arrives, whatever its
    Content-Length says (a chunked body declares none), before more of it is buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # raised into the endpoint reading the body: ApiError's handler
                    raise too_large(f"request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, receive_within_limit, send)


def decode_base64(data: str, field: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{field} is not valid base64", code="invalid_base64") from None
