"""The FastAPI gateway: HTTP in, preprocessing per the model card, Triton for the model."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import ApiError, bad_request, too_large, unsupported_media
from .images import decode_image, preprocess
from .model_card import ModelCard
from .schemas import Embedding, EmbeddingsRequest, EmbeddingsResponse, ErrorResponse
from .settings import Settings
from .triton_backend import TritonBackend

log = logging.getLogger(__name__)

ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 503, 504)}


def _multipart_or_json(model) -> dict:
    """OpenAPI request body for endpoints that take JSON or multipart ``images`` file parts."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "normalize": {"type": "boolean"},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        }, "required": ["images"]}},
    }}}


class ImageRequest:
    """Images and options of one request, from JSON (base64) or multipart (file parts ``images``)."""

    def __init__(self, images: list[bytes], options: dict):
        self.images = images
        self.options = options

    @classmethod
    async def read(cls, request: Request, settings: Settings) -> "ImageRequest":
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_request_bytes:
            raise too_large(f"request body is {length} bytes; the limit is {settings.max_request_bytes}")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            return await cls._from_multipart(request, settings)
        if content_type in ("application/json", ""):
            return await cls._from_json(request, settings)
        raise unsupported_media(f"content type {content_type!r}: send application/json or multipart/form-data")

    @classmethod
    async def _from_json(cls, request: Request, settings: Settings) -> "ImageRequest":
        body = await request.body()
        if len(body) > settings.max_request_bytes:
            raise too_large(f"request body is larger than {settings.max_request_bytes} bytes")
        try:
            parsed = EmbeddingsRequest.model_validate_json(body)
        except ValidationError as exc:
            raise ApiError(422, "validation_error", _describe(exc)) from None
        cls._check_count(len(parsed.images), settings)
        images = []
        for i, item in enumerate(parsed.images):
            try:
                images.append(base64.b64decode(item.data, validate=True))
            except (binascii.Error, ValueError):
                raise bad_request(f"images[{i}].data is not valid base64", code="invalid_base64") from None
        return cls(images, parsed.model_dump(exclude={"images"}))

    @classmethod
    async def _from_multipart(cls, request: Request, settings: Settings) -> "ImageRequest":
        try:
            form = await request.form(max_files=settings.max_images_per_request + 1)
        except Exception as exc:  # the multipart parser raises several types for malformed bodies
            raise bad_request(f"malformed multipart body: {exc}") from None
        files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
        if not files:
            raise ApiError(422, "validation_error", "multipart body has no file parts named 'images'")
        cls._check_count(len(files), settings)
        images = [await f.read() for f in files]
        options = {k: v for k, v in form.items() if k != "images"}
        try:
            parsed = EmbeddingsRequest.model_validate({"images": [{"data": ""}], **options})
        except ValidationError as exc:
            raise ApiError(422, "validation_error", _describe(exc)) from None
        return cls(images, parsed.model_dump(exclude={"images"}))

    @staticmethod
    def _check_count(count: int, settings: Settings) -> None:
        if count > settings.max_images_per_request:
            raise too_large(f"{count} images in one request; the limit is {settings.max_images_per_request}")


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def create_app(settings: Settings, card: ModelCard, backend: TritonBackend) -> FastAPI:
    """The ASGI app. Readiness turns true once the model has answered a warm-up request."""
    state = {"ready": False}

    async def warm_up() -> None:
        spec = card.preprocess
        sample = np.zeros((1, 3, spec.crop, spec.crop), dtype=np.float32)
        deadline = asyncio.get_running_loop().time() + settings.ready_timeout_s
        while True:
            try:
                if await backend.is_ready():
                    await backend.infer(sample, ("embedding",))
                    state["ready"] = True
                    log.info("model %s answered its warm-up request; ready", card.name)
                    return
            except ApiError as exc:
                log.warning("warm-up failed: %s", exc.message)
            if asyncio.get_running_loop().time() > deadline:
                log.error("model %s not ready after %.0f s", card.name, settings.ready_timeout_s)
                return
            await asyncio.sleep(0.5)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(warm_up())
        try:
            yield
        finally:
            task.cancel()
            await backend.close()

    app = FastAPI(
        title="dinoserve",
        version=__version__,
        description="Self-supervised (DINO / iBOT) image embeddings served through NVIDIA Triton.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(ApiError(500, "internal_error", "internal server error").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return JSONResponse(ApiError(422, "validation_error", str(exc.errors())).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(ApiError(exc.status_code, code, str(exc.detail)).body(), status_code=exc.status_code)

    async def pixel_batch(images: list[bytes]) -> np.ndarray:
        def prepare(data: bytes) -> np.ndarray:
            return preprocess(decode_image(data, settings.max_image_pixels), card.preprocess)

        tensors = await asyncio.gather(*(run_in_threadpool(prepare, data) for data in images))
        return np.stack(tensors)

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERRORS,
              openapi_extra=_multipart_or_json(EmbeddingsRequest), tags=["embeddings"])
    async def embeddings(request: Request) -> EmbeddingsResponse:
        """Embed one or more images: the CLS token after the final norm (DINO's k-NN feature)."""
        body = await ImageRequest.read(request, settings)
        result = await backend.infer(await pixel_batch(body.images), ("embedding",))
        vectors = result["embedding"].astype(np.float32)
        if body.options["normalize"]:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return EmbeddingsResponse(model=card.name, dim=card.embed_dim, data=[
            Embedding(index=i, embedding=_encode(v, body.options["encoding_format"])) for i, v in enumerate(vectors)
        ])

    @app.get("/v1/models", tags=["models"])
    async def models() -> dict:
        """The model card(s) served: architecture, preprocessing, outputs, source checkpoint."""
        return {"object": "list", "data": [card.raw]}

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def readyz():
        """Readiness: the model answered its warm-up and Triton still reports it ready."""
        if state["ready"] and await backend.is_ready():
            return {"status": "ready", "model": card.name}
        return JSONResponse(
            ApiError(503, "not_ready", f"model {card.name} is not ready").body(), status_code=503
        )

    return app
