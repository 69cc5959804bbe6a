"""The FastAPI gateway: HTTP in, preprocessing per the model card, Triton for the model. ``create_app``
assembles it: the objects the routes receive (``app.state``), the lifespan (store, warm-up, demo collection),
the middleware, the error handlers and the routes (``service/routes``)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager, suppress

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.model_card import ModelCard

from . import __version__
from .auth import ApiKeys, access_control
from .collections import open_store
from .demo_samples import fill_demo_collection
from .errors import ApiError
from .inference import Inference
from .metrics import GatewayMetrics
from .observability import ObservabilityMiddleware
from .request_body import BodySizeLimit
from .routes import api_router
from .settings import Settings
from .triton_backend import TritonBackend

log = logging.getLogger(__name__)


async def _warm_up(app: FastAPI) -> None:
    """Until the model answers a request: then the gateway is ready (``app.state.ready``)."""
    settings, card, backend = app.state.settings, app.state.card, app.state.inference.backend
    sample = np.zeros((1, 3, card.preprocess.crop, card.preprocess.crop), dtype=np.float32)
    loop = asyncio.get_running_loop()
    next_warning = loop.time() + settings.ready_timeout_s
    while True:  # an external Triton may come up after the gateway: keep trying
        try:
            if await backend.is_ready():
                await backend.infer(sample, ("embedding",), timeout_s=settings.ready_timeout_s)
                app.state.ready = True
                log.info("model %s answered its warm-up request; ready", card.name)
                return
        except ApiError as exc:
            log.debug("warm-up failed: %s", exc.message)
        if loop.time() > next_warning:
            log.warning("model %s is still not ready on Triton at %s", card.name, backend.url)
            next_warning = loop.time() + settings.ready_timeout_s
        await asyncio.sleep(0.5)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings, inference = app.state.settings, app.state.inference
    app.state.store = await run_in_threadpool(open_store, settings.vector_store, settings.data_dir)
    task = asyncio.create_task(_warm_up(app))
    demo = None
    if settings.demo_collection:
        demo = asyncio.create_task(fill_demo_collection(settings.demo_collection, app.state.store, inference,
                                                        model_ready=task))
    try:
        yield
    finally:
        task.cancel()
        if demo is not None:
            demo.cancel()
            with suppress(asyncio.CancelledError):
                await demo  # a write in progress finishes before the store closes
        await inference.backend.close()
        await run_in_threadpool(app.state.store.close)


async def _api_error(_: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError):
    return JSONResponse(ApiError(422, "validation_error", str(exc.errors())).body(), status_code=422)


async def _http_error(_: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(ApiError(exc.status_code, code, str(exc.detail)).body(), status_code=exc.status_code)


def create_app(settings: Settings, card: ModelCard, backend: TritonBackend, keys: ApiKeys | None) -> FastAPI:
    """The ASGI app. Readiness turns true once the model has answered a warm-up request. With ``keys``, every
    ``/v1`` endpoint needs one of them (collection changes a write key); None serves without auth."""
    app = FastAPI(
        title="dinoserve",
        version=__version__,
        description="Self-supervised (DINO / iBOT) image embeddings served through NVIDIA Triton.",
        lifespan=_lifespan,
    )
    metrics = GatewayMetrics(settings.max_inflight)
    app.state.settings, app.state.card, app.state.ready = settings, card, False
    app.state.inference = Inference(settings, card, backend, metrics)
    # Request ids, access lines, request metrics, and the JSON 500 of an exception no handler took.
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(api_router(card, access_control(keys)))
    return app
