"""The FastAPI gateway: HTTP in, preprocessing per the model card, Triton for the model."""

from __future__ import annotations

import asyncio
import base64
import logging
from contextlib import asynccontextmanager, suppress

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.model_card import ModelCard

from . import __version__
from .auth import ApiKeys, access_control
from .collections import open_store
from .collections_api import collections_router
from .demo_page import demo_page_router
from .demo_samples import fill_demo_collection
from .errors import ApiError, too_large
from .inference import Inference
from .metrics import GatewayMetrics
from .observability import ObservabilityMiddleware
from .request_body import ERROR_RESPONSES, BodySizeLimit, body_kind, decode_base64, read_form, read_json, validate
from .schemas import EmbeddingsRequest, EmbeddingsResponse, ErrorResponse
from .segment_api import segment_router
from .settings import Settings
from .triton_backend import TritonBackend

log = logging.getLogger(__name__)

def _multipart_or_json(model) -> dict:
    """OpenAPI request body for endpoints that take JSON or multipart ``images`` file parts."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
            "normalize": {"type": "boolean"},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
        }, "required": ["images"], "additionalProperties": False}},
    }}}


class ImageRequest:
    """Images and options of one request, from JSON (base64) or multipart (file parts ``images``)."""

    def __init__(self, images: list[bytes], options: dict):
        self.images = images
        self.options = options

    @classmethod
    async def read(cls, request: Request, settings: Settings) -> "ImageRequest":
        if body_kind(request, settings) == "multipart":
            form = await read_form(request, max_files=settings.max_images_per_request + 1)
            files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
            if not files:
                raise ApiError(422, "validation_error", "multipart body has no file parts named 'images'")
            cls._check_count(len(files), settings)
            options = {k: v for k, v in form.items() if k != "images"}
            parsed = validate(EmbeddingsRequest, {"images": [{"data": ""}], **options})
            return cls([await f.read() for f in files], parsed.model_dump(exclude={"images"}))
        parsed = await read_json(request, settings, EmbeddingsRequest)
        cls._check_count(len(parsed.images), settings)
        images = [decode_base64(item.data, f"images[{i}].data") for i, item in enumerate(parsed.images)]
        return cls(images, parsed.model_dump(exclude={"images"}))

    @staticmethod
    def _check_count(count: int, settings: Settings) -> None:
        if count > settings.max_images_per_request:
            raise too_large(f"{count} images in one request; the limit is {settings.max_images_per_request}")


def embeddings_json(model: str, vectors: np.ndarray, encoding_format: str) -> bytes:
    """The ``EmbeddingsResponse`` body of float32 ``vectors`` ``[B, D]``, serialised by orjson straight from
    NumPy: each number in the shortest text that reads back as the same float32 (fewer bytes and less time
    than Pydantic writing the float64 values of ``tolist()``)."""
    if encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = list(vectors)
    return orjson.dumps({"object": "list", "model": model, "dim": vectors.shape[1], "data": [
        {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)
    ]}, option=orjson.OPT_SERIALIZE_NUMPY)


def create_app(settings: Settings, card: ModelCard, backend: TritonBackend, keys: ApiKeys | None) -> FastAPI:
    """The ASGI app. Readiness turns true once the model has answered a warm-up request. With ``keys``, every
    ``/v1`` endpoint needs one of them (collection changes a write key); None serves without auth."""
    state = {"ready": False}
    access = access_control(keys)
    metrics = GatewayMetrics(settings.max_inflight)
    inference = Inference(settings, card, backend, metrics)

    async def warm_up() -> None:
        spec = card.preprocess
        sample = np.zeros((1, 3, spec.crop, spec.crop), dtype=np.float32)
        loop = asyncio.get_running_loop()
        next_warning = loop.time() + settings.ready_timeout_s
        while True:  # an external Triton may come up after the gateway: keep trying
            try:
                if await backend.is_ready():
                    await backend.infer(sample, ("embedding",), timeout_s=settings.ready_timeout_s)
                    state["ready"] = True
                    log.info("model %s answered its warm-up request; ready", card.name)
                    return
            except ApiError as exc:
                log.debug("warm-up failed: %s", exc.message)
            if loop.time() > next_warning:
                log.warning("model %s is still not ready on Triton at %s", card.name, backend.url)
                next_warning = loop.time() + settings.ready_timeout_s
            await asyncio.sleep(0.5)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = await run_in_threadpool(open_store, settings.vector_store, settings.data_dir)
        task = asyncio.create_task(warm_up())
        demo = None
        if settings.demo_collection:
            demo = asyncio.create_task(fill_demo_collection(settings.demo_collection, app.state.store, card,
                                                            backend, model_ready=task))
        try:
            yield
        finally:
            task.cancel()
            if demo is not None:
                demo.cancel()
                with suppress(asyncio.CancelledError):
                    await demo  # a write in progress finishes before the store closes
            await backend.close()
            await run_in_threadpool(app.state.store.close)

    app = FastAPI(
        title="dinoserve",
        version=__version__,
        description="Self-supervised (DINO / iBOT) image embeddings served through NVIDIA Triton.",
        lifespan=lifespan,
    )

    # Request ids, access lines, request metrics, and the JSON 500 of an exception no handler took.
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return JSONResponse(ApiError(422, "validation_error", str(exc.errors())).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(ApiError(exc.status_code, code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, dependencies=access.read,
              responses={**ERROR_RESPONSES, **access.read_responses},
              openapi_extra=_multipart_or_json(EmbeddingsRequest), tags=["embeddings"])
    async def embeddings(request: Request) -> Response:
        """Embed one or more images: the CLS token after the final norm (DINO's k-NN feature)."""
        body = await ImageRequest.read(request, settings)
        async with inference.slot():
            result = await inference.run(await inference.pixel_batch(body.images), ("embedding",))
        with metrics.stage("postprocess"):
            vectors = result["embedding"].astype(np.float32, copy=False)
            if body.options["normalize"]:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            content = embeddings_json(card.name, vectors, body.options["encoding_format"])
        return Response(content, media_type="application/json")

    @app.get("/v1/models", tags=["models"], dependencies=access.read, responses=access.read_responses)
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

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {metrics.content_type: {}}, "description": "Prometheus text format"}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests by route and status, stage times, in-flight and rejected requests."""
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(segment_router(settings, card, inference), dependencies=access.read,
                       responses=access.read_responses)
    app.include_router(collections_router(settings, card, inference, access), dependencies=access.read,
                       responses=access.read_responses)
    app.include_router(demo_page_router(settings))
    return app
