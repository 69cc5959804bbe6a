"""Request bodies of the image endpoints, read one way: JSON (base64 images) or multipart (file parts and
form fields), validated against the endpoint's one pydantic model, with the size limits and error statuses
of docs/api.md applied the same way everywhere. ``read_request`` is the reader and ``request_body`` the
OpenAPI statement of such a body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, bad_request, too_large, unsupported_media
from .schemas import ErrorResponse, ImageData
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


@dataclass(frozen=True)
class Multipart:
    """How an endpoint's multipart form maps onto its JSON request model.

    ``files``: file part name → the model field its images go to; a field in ``single`` takes exactly one
    image, the others a list. With ``items`` set, each image becomes an object of that list field instead,
    with the form fields ``per_image`` (given once per image) and ``per_image_or_all`` (once per image, or once
    for all). Text fields named in ``json_fields`` hold JSON, those in ``csv_fields`` comma-separated lists;
    every other text field is the model field of its name, given once."""

    files: dict[str, str]
    single: tuple[str, ...] = ()
    items: str | None = None
    per_image: tuple[str, ...] = ()
    per_image_or_all: tuple[str, ...] = ()
    json_fields: tuple[str, ...] = ()
    csv_fields: tuple[str, ...] = ()


async def read_request(request: Request, settings: Settings, model: type[Model], form: Multipart) -> Model:
    """The request body as ``model``, from JSON or from a multipart form laid out by ``form``, every image's
    bytes decoded (``ImageData.decode``). 413 past ``max_images_per_request`` images, counted before any is
    decoded."""
    if body_kind(request, settings) == "json":
        parsed = await read_json(request, settings, model)
    else:
        values = await _form_values(await read_form(request, max_files=settings.max_images_per_request + 1), form)
        parsed = validate(model, values)
    images = list(_images(parsed, ""))
    if len(images) > settings.max_images_per_request:
        raise too_large(f"{len(images)} images in one request; the limit is {settings.max_images_per_request}")
    for where, image in images:
        image.decode(where)
    return parsed


def _images(value, where: str) -> Iterator[tuple[str, ImageData]]:
    """Every ``ImageData`` in a parsed request, with the path of its ``data`` field (``items[3].image.data``)."""
    if isinstance(value, ImageData):
        yield f"{where}.data", value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _images(getattr(value, name), f"{where}.{name}" if where else name)
    elif isinstance(value, list):
        for i, element in enumerate(value):
            yield from _images(element, f"{where}[{i}]")


async def _form_values(form: FormData, layout: Multipart) -> dict:
    """The model's input from a multipart form: images as ``ImageData.upload``, the form fields by name."""
    uploads: dict[str, list[ImageData]] = {}
    text: dict[str, list[str]] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in layout.files:
                raise ApiError(422, "validation_error", f"unexpected file part {name!r}")
            uploads.setdefault(layout.files[name], []).append(ImageData.upload(await value.read()))
        elif name in layout.files:
            raise ApiError(422, "validation_error", f"form field {name!r} must be a file part")
        else:
            text.setdefault(name, []).append(value)
    if not uploads:
        names = " or ".join(repr(name) for name in layout.files)
        raise ApiError(422, "validation_error", f"multipart body has no file parts named {names}")
    values: dict = {}
    for target, images in uploads.items():
        if target in layout.single:
            if len(images) != 1:
                raise ApiError(422, "validation_error",
                               f"multipart body needs exactly one file part named {target!r}; it has {len(images)}")
            values[target] = images[0]
        else:
            values[target] = images
    if layout.items is not None:
        images = values.pop(layout.items)
        fields = {name: _per_image(name, text.pop(name, []), len(images), layout)
                  for name in layout.per_image + layout.per_image_or_all}
        values[layout.items] = [{"image": image, **{name: column[i] for name, column in fields.items()
                                                     if column[i] is not None}} for i, image in enumerate(images)]
    for name, given in text.items():
        if len(given) != 1:
            raise ApiError(422, "validation_error", f"form field {name!r} is given {len(given)} times")
        values[name] = _text_value(name, given[0], layout)
    return values


def _per_image(name: str, given: list[str], count: int, layout: Multipart) -> list:
    """A form field's value for each image (``None`` for each when absent)."""
    once = name in layout.per_image_or_all
    if len(given) not in (0, count) and not (once and len(given) == 1):
        raise ApiError(422, "validation_error", f"{len(given)} '{name}' fields for {count} images: give one per "
                                                f"image" + (" or one for all" if once else ""))
    values = [_text_value(name, value, layout) for value in given]
    return values * count if len(values) == 1 else values or [None] * count


def _text_value(name: str, value: str, layout: Multipart):
    if name in layout.json_fields:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ApiError(422, "validation_error", f"form field {name!r} is not valid JSON") from None
    if name in layout.csv_fields:
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with its ``$defs`` substituted, to stand alone inside the OpenAPI document."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:  # the definition, with the reference's own keys (its description) on top
                siblings = {key: resolve(value) for key, value in node.items() if key != "$ref"}
                return {**resolve(definitions[node["$ref"].rsplit("/", 1)[1]]), **siblings}
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


def request_body(model: type[BaseModel], parts: dict | None = None, required_parts: tuple[str, ...] = (),
                 required: bool = True) -> dict:
    """``openapi_extra`` of an endpoint whose body is the JSON ``model`` or, given ``parts`` (name → schema;
    no others are accepted), a multipart form read by ``read_request``, ``required_parts`` among them."""
    content = {"application/json": {"schema": inline_schema(model)}}
    if parts is not None:
        form = {"type": "object", "properties": parts, "additionalProperties": False}
        if required_parts:
            form["required"] = list(required_parts)
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": required, "content": content}}


IMAGE_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
IMAGE_FILE = {"type": "string", "format": "binary"}
JSON_TEXT = {"type": "string", "description": "JSON"}
