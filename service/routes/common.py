"""What the route handlers share: the gateway's objects as FastAPI dependencies (``create_app`` puts them on
``app.state``), the vector store as coroutines, and the rules every collection endpoint applies."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

from core.model_card import ModelCard

from ..collections import NAME_PATTERN, CollectionInfo, VectorStore
from ..errors import ApiError, too_large
from ..inference import Inference
from ..metrics import GatewayMetrics
from ..request_body import ERROR_RESPONSES
from ..schemas import ErrorResponse
from ..settings import Settings

MAX_VECTORS = 4096  # raw vectors, ids or items in one request
RESPONSES = {**ERROR_RESPONSES, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}
# The name rule in the OpenAPI schema, for clients and generated tests; ``check_name`` enforces it (422
# ``invalid_collection_name``), so the schema only documents it.
CollectionName = Annotated[str, Path(json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"})]


class AsyncStore:
    """The vector store's blocking methods as coroutines: ``await store.describe(name)`` runs
    ``VectorStore.describe`` in the thread pool, timed as the ``store`` stage."""

    def __init__(self, store: VectorStore, metrics: GatewayMetrics):
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        async def call(*args):
            with self._metrics.stage("store"):
                return await run_in_threadpool(method, *args)

        return call


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _card(request: Request) -> ModelCard:
    return request.app.state.card


def _inference(request: Request) -> Inference:
    return request.app.state.inference


def _store(request: Request) -> AsyncStore:
    return AsyncStore(request.app.state.store, request.app.state.inference.metrics)


SettingsDep = Annotated[Settings, Depends(_settings)]
CardDep = Annotated[ModelCard, Depends(_card)]
InferenceDep = Annotated[Inference, Depends(_inference)]
StoreDep = Annotated[AsyncStore, Depends(_store)]


def check_model(info: CollectionInfo, card: ModelCard) -> None:
    """409 unless the collection holds embeddings of the served model: images meet only those."""
    if (info.model, info.dim) != (card.name, card.embed_dim):
        raise ApiError(409, "model_mismatch",
                       f"collection {info.name!r} holds embeddings of model {info.model!r} (dim {info.dim}); "
                       f"this gateway serves {card.name!r} (dim {card.embed_dim}). Embeddings of different "
                       f"models are not comparable: search it with raw vectors, serve {info.model!r}, or "
                       f"index the images into a new collection.")


def matrix(vectors: list[list[float]], dim: int, field: str, single: bool = False) -> np.ndarray:
    """``(n, dim)`` float32; 422 naming the first vector of another dimension (``field`` or ``field[i]``),
    413 past ``MAX_VECTORS``."""
    if len(vectors) > MAX_VECTORS:
        raise too_large(f"{len(vectors)} vectors in one request; the limit is {MAX_VECTORS}")
    for i, v in enumerate(vectors):
        if len(v) != dim:
            where = field if single else f"{field}[{i}]"
            raise ApiError(422, "wrong_dimension", f"{where} has dimension {len(v)}; the collection's is {dim}")
    return np.asarray(vectors, dtype=np.float32).reshape(len(vectors), dim)
