"""``POST /v1/collections/{name}/search`` (similarity search) and ``POST /v1/classify`` (DINO's weighted k-NN
vote). Queries are images (embedded through Triton and L2-normalised), raw vectors of the collection's
dimension, or, for search, stored items."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request

from core.knn import label_shares
from core.model_card import ModelCard

from ..collections import CollectionInfo, Hit, ItemFilter, check_name
from ..collections_schemas import (
    MAX_K,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    ClassScore,
    SearchFilter,
    SearchHit,
    SearchRequest,
    SearchResponse,
    SearchResults,
)
from ..errors import ApiError, too_large
from ..inference import Inference
from ..request_body import IMAGE_FILE, IMAGE_FILES, JSON_TEXT, Multipart, read_request, request_body
from ..schemas import ImageData
from .common import (
    MAX_VECTORS,
    RESPONSES,
    CardDep,
    CollectionName,
    InferenceDep,
    SettingsDep,
    StoreDep,
    check_model,
    matrix,
)

SEARCH_FORM = Multipart(files={"image": "image", "images": "images"}, single=("image",), json_fields=("filter",))
SEARCH_BODY = request_body(SearchRequest, {"image": IMAGE_FILE, "images": IMAGE_FILES, "k": {"type": "integer"},
                                           "filter": JSON_TEXT})
CLASSIFY_FORM = Multipart(files={"images": "images", "image": "images"}, json_fields=("filter",))
CLASSIFY_BODY = request_body(ClassifyRequest, {
    "images": IMAGE_FILES, "collection": {"type": "string"}, "k": {"type": "integer"},
    "temperature": {"type": "number"}, "top": {"type": "integer"}, "filter": JSON_TEXT})


async def query_vectors(info: CollectionInfo, card: ModelCard, inference: Inference,
                        images: list[ImageData] | None, vectors: list | None, single: bool = False) -> np.ndarray:
    """The queries as unit vectors: images embedded by the served model (409 for a collection of another),
    or raw vectors of the collection's dimension."""
    if images is not None:
        check_model(info, card)
        return await inference.embed([image.content for image in images], normalize=True)
    return matrix(vectors, info.dim, "vector" if single else "vectors", single)


def hits(found: list[Hit]) -> list[SearchHit]:
    return [SearchHit(id=h.id, score=h.score, label=h.label, metadata=h.metadata) for h in found]


def item_filter(spec: SearchFilter | None, labelled: bool = False) -> ItemFilter:
    if spec is None:
        return ItemFilter(labelled=labelled)
    return ItemFilter(label=spec.label, metadata=dict(spec.metadata), labelled=labelled)


async def search(name: CollectionName, request: Request, settings: SettingsDep, card: CardDep,
                 inference: InferenceDep, store: StoreDep) -> SearchResponse:
    """The ``k`` items most cosine-similar to an image, a vector or a stored item (itself left out),
    optionally filtered by label and metadata; ``images``, ``vectors`` or ``ids`` for a batch."""
    info = await store.describe(check_name(name))
    query = await read_request(request, settings, SearchRequest, SEARCH_FORM)
    single = query.images is None and query.vectors is None and query.ids is None
    ids = [query.id] if query.id is not None else query.ids
    if ids is not None:
        if len(ids) > MAX_VECTORS:
            raise too_large(f"{len(ids)} ids in one request; the limit is {MAX_VECTORS}")
        queries = np.stack([item.vector for item in await store.get_many(name, ids)])
    else:
        images = [query.image] if query.image is not None else query.images
        vectors = [query.vector] if query.vector is not None else query.vectors
        queries = await query_vectors(info, card, inference, images, vectors, single=query.vector is not None)
    extra = 1 if ids is not None else 0  # the stored item finds itself first
    found = await store.search(name, queries, min(query.k + extra, MAX_K + 1), item_filter(query.filter))
    if ids is not None:
        found = [[h for h in row if h.id != item_id][:query.k] for row, item_id in zip(found, ids)]
    if single:
        return SearchResponse(results=hits(found[0]))
    return SearchResponse(data=[SearchResults(index=i, results=hits(row)) for i, row in enumerate(found)])


async def classify(request: Request, settings: SettingsDep, card: CardDep, inference: InferenceDep,
                   store: StoreDep) -> ClassifyResponse:
    """DINO's weighted k-NN: the ``k`` labelled items most similar to each image or vector vote for their
    label with weight ``exp(cosine / T)``; labels are returned with their share of the votes."""
    query = await read_request(request, settings, ClassifyRequest, CLASSIFY_FORM)
    info = await store.describe(check_name(query.collection))
    queries = await query_vectors(info, card, inference, query.images, query.vectors)
    found = await store.search(info.name, queries, query.k, item_filter(query.filter, labelled=True))
    if not all(found):
        raise ApiError(422, "no_labelled_items",
                       f"collection {info.name!r} has no labelled items" + (" matching the filter"
                                                                             if query.filter else ""))
    data = []
    for i, row in enumerate(found):
        shares = label_shares(np.array([h.score for h in row]), [h.label for h in row], query.temperature)
        data.append(Classification(index=i, label=shares[0][0], neighbors=hits(row),
                                   scores=[ClassScore(label=lab, score=s) for lab, s in shares[:query.top]]))
    return ClassifyResponse(collection=info.name, k=max(len(row) for row in found), temperature=query.temperature,
                            data=data)


def add_routes(router: APIRouter) -> None:
    router.add_api_route("/v1/collections/{name}/search", search, methods=["POST"], response_model=SearchResponse,
                         response_model_exclude_none=True, responses=RESPONSES, openapi_extra=SEARCH_BODY,
                         tags=["collections"])
    router.add_api_route("/v1/classify", classify, methods=["POST"], response_model=ClassifyResponse,
                         responses=RESPONSES, openapi_extra=CLASSIFY_BODY, tags=["classification"])
