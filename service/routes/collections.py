"""``/v1/collections`` and ``/v1/collections/{name}``: create, list, describe and drop collections.

A collection remembers the model its embeddings came from (the served one when it is created): images meet
only collections of the served model, since embeddings of two models are not comparable."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError

from ..auth import Access
from ..collections import CollectionInfo, IndexConfig, check_name
from ..collections_schemas import CollectionList, CollectionResponse, CreateCollectionRequest, HnswOptions
from ..request_body import request_body, validation_error
from .common import RESPONSES, CardDep, CollectionName, StoreDep


def collection_response(info: CollectionInfo) -> CollectionResponse:
    hnsw = None
    if info.index.kind == "hnsw":
        hnsw = HnswOptions(m=info.index.m, ef_construction=info.index.ef_construction, ef_search=info.index.ef_search)
    return CollectionResponse(name=info.name, model=info.model, dim=info.dim, metric=info.metric,
                              index=info.index.kind, hnsw=hnsw, count=info.count, created_at=info.created_at)


async def create_collection(name: CollectionName, request: Request, card: CardDep,
                            store: StoreDep) -> CollectionResponse:
    """Create a collection for the served model's embeddings (409 if it exists)."""
    check_name(name)
    body = await request.body()
    try:
        spec = CreateCollectionRequest.model_validate_json(body) if body.strip() else CreateCollectionRequest()
    except ValidationError as exc:
        raise validation_error(exc) from None
    options = (spec.hnsw or HnswOptions()).model_dump() if spec.index == "hnsw" else {}
    info = await store.create_collection(name, card.name, card.embed_dim, IndexConfig(spec.index, **options))
    return collection_response(info)


async def list_collections(store: StoreDep) -> CollectionList:
    """Every collection, with its model, dimension, index and item count."""
    return CollectionList(data=[collection_response(info) for info in await store.list_collections()])


async def describe_collection(name: CollectionName, store: StoreDep) -> CollectionResponse:
    return collection_response(await store.describe(check_name(name)))


async def drop_collection(name: CollectionName, store: StoreDep) -> dict:
    """Delete a collection and all its items."""
    await store.drop_collection(check_name(name))
    return {"name": name, "deleted": True}


def add_routes(router: APIRouter, access: Access) -> None:
    writes = {"dependencies": access.write, "responses": {**RESPONSES, **access.write_responses}}
    body = request_body(CreateCollectionRequest, required=False)
    router.add_api_route("/v1/collections/{name}", create_collection, methods=["PUT"],
                         response_model=CollectionResponse, status_code=201, openapi_extra=body,
                         tags=["collections"], **writes)
    router.add_api_route("/v1/collections", list_collections, methods=["GET"], response_model=CollectionList,
                         tags=["collections"])
    router.add_api_route("/v1/collections/{name}", describe_collection, methods=["GET"],
                         response_model=CollectionResponse, responses=RESPONSES, tags=["collections"])
    router.add_api_route("/v1/collections/{name}", drop_collection, methods=["DELETE"], tags=["collections"],
                         **writes)
