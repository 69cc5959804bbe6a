"""The model card (``GET /v1/models``), liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import ApiError
from ..metrics import GatewayMetrics
from ..schemas import ErrorResponse
from .common import CardDep, InferenceDep


async def models(card: CardDep) -> dict:
    """The model card(s) served: architecture, preprocessing, outputs, source checkpoint."""
    return {"object": "list", "data": [card.raw]}


async def healthz() -> dict:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


async def readyz(request: Request, card: CardDep, inference: InferenceDep):
    """Readiness: the model answered its warm-up and Triton still reports it ready."""
    if request.app.state.ready and await inference.backend.is_ready():
        return {"status": "ready", "model": card.name}
    return JSONResponse(ApiError(503, "not_ready", f"model {card.name} is not ready").body(), status_code=503)


async def prometheus_metrics(inference: InferenceDep) -> Response:
    """Prometheus metrics: requests by route and status, stage times, in-flight and rejected requests."""
    return Response(inference.metrics.render(), media_type=GatewayMetrics.content_type)


def add_model_routes(router: APIRouter) -> None:
    """``/v1/models``, behind the read scope like every ``/v1`` route."""
    router.add_api_route("/v1/models", models, methods=["GET"], tags=["models"])


def add_health_routes(router: APIRouter) -> None:
    """Liveness, readiness and metrics: open to probes and scrapers, no API key."""
    router.add_api_route("/healthz", healthz, methods=["GET"], tags=["health"])
    router.add_api_route("/readyz", readyz, methods=["GET"], tags=["health"], responses={503: {"model": ErrorResponse}})
    router.add_api_route("/metrics", prometheus_metrics, methods=["GET"], tags=["health"], response_class=Response,
                         responses={200: {"content": {GatewayMetrics.content_type: {}},
                                          "description": "Prometheus text format"}})
