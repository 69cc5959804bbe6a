"""``/v1/collections/...`` (similarity search) and ``/v1/classify`` (DINO's weighted k-NN vote).

Images are embedded through Triton like ``/v1/embeddings`` and L2-normalised; raw vectors of the
collection's dimension are accepted everywhere an image is. A collection remembers the model its
embeddings came from: images meet only collections of the served model (409 otherwise), since
embeddings of two models are not comparable.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from core.knn import label_shares
from core.model_card import ModelCard

from .auth import Access
from .collections import NAME_PATTERN, CollectionInfo, Hit, IndexConfig, Item, ItemFilter, VectorStore, check_name
from .collections_schemas import (
    MAX_K,
    AddItemsRequest,
    AddItemsResponse,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    ClassScore,
    CollectionList,
    CollectionResponse,
    CreateCollectionRequest,
    HnswOptions,
    ItemId,
    ItemList,
    ItemResponse,
    ItemSummary,
    Label,
    SearchFilter,
    SearchHit,
    SearchRequest,
    SearchResponse,
    SearchResults,
)
from .errors import ApiError, too_large
from .inference import Inference
from .request_body import ERROR_RESPONSES, body_kind, decode_base64, read_form, read_json, validate, validation_error
from .schemas import ErrorResponse
from .settings import Settings

MAX_VECTORS = 4096  # raw vectors, ids or items in one request
RESPONSES = {**ERROR_RESPONSES, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}
IMAGE_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
JSON_TEXT = {"type": "string", "description": "JSON"}
# The name rule in the OpenAPI schema, for clients and generated tests; ``check_name`` enforces it (422
# ``invalid_collection_name``), so the schema only documents it.
CollectionName = Annotated[str, Path(json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"})]


def _inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with its ``$defs`` substituted, to stand alone inside the OpenAPI document."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


def _request_body(model: type[BaseModel], multipart: dict | None = None, required: bool = True) -> dict:
    """OpenAPI request body: JSON ``model``, and multipart form fields ``multipart`` if given."""
    content = {"application/json": {"schema": _inline_schema(model)}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": multipart}}
    return {"requestBody": {"required": required, "content": content}}


@dataclass
class _NewItem:
    """One item of an add request, before embedding: an image or a vector."""

    id: str | None
    image: bytes | None
    vector: list[float] | None
    label: str | None
    metadata: dict


class _MultipartItemFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: ItemId | None = None
    label: Label | None = None
    metadata: dict = Field(default_factory=dict)


def _parse_json(raw: str, name: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ApiError(422, "validation_error", f"form field {name!r} is not valid JSON") from None


def _json_field(form: FormData, name: str):
    raw = form.get(name)
    return None if raw is None or isinstance(raw, UploadFile) else _parse_json(raw, name)


def _files(form: FormData, *names: str) -> list[UploadFile]:
    return [f for name in names for f in form.getlist(name) if isinstance(f, UploadFile)]


def _per_file(form: FormData, name: str, count: int) -> list:
    """A repeated form field: none, one for every file, or one per file."""
    values = [v for v in form.getlist(name) if not isinstance(v, UploadFile)]
    if len(values) not in (0, 1, count) or (name == "id" and len(values) not in (0, count)):
        raise ApiError(422, "validation_error",
                       f"{len(values)} '{name}' fields for {count} images: give one per image"
                       + ("" if name == "id" else " or one for all"))
    return values * count if len(values) == 1 else values or [None] * count


def _matrix(vectors: list[list[float]], dim: int, field: str, single: bool = False) -> np.ndarray:
    """``(n, dim)`` float32; 422 naming the first vector of another dimension (``field`` or ``field[i]``)."""
    for i, v in enumerate(vectors):
        if len(v) != dim:
            where = field if single else f"{field}[{i}]"
            raise ApiError(422, "wrong_dimension", f"{where} has dimension {len(v)}; the collection's is {dim}")
    return np.asarray(vectors, dtype=np.float32).reshape(len(vectors), dim)


def _collection_response(info: CollectionInfo) -> CollectionResponse:
    hnsw = None
    if info.index.kind == "hnsw":
        hnsw = HnswOptions(m=info.index.m, ef_construction=info.index.ef_construction, ef_search=info.index.ef_search)
    return CollectionResponse(name=info.name, model=info.model, dim=info.dim, metric=info.metric,
                              index=info.index.kind, hnsw=hnsw, count=info.count, created_at=info.created_at)


def _hits(hits: list[Hit]) -> list[SearchHit]:
    return [SearchHit(id=h.id, score=h.score, label=h.label, metadata=h.metadata) for h in hits]


def _where(spec: SearchFilter | None, labelled: bool = False) -> ItemFilter:
    if spec is None:
        return ItemFilter(labelled=labelled)
    return ItemFilter(label=spec.label, metadata=dict(spec.metadata), labelled=labelled)


def collections_router(settings: Settings, card: ModelCard, inference: Inference, access: Access) -> APIRouter:
    """The collection and classification endpoints; the store is ``app.state.store`` (opened by the app).
    The endpoints that change a collection take ``access.write``; the app adds ``access.read`` to all."""
    router = APIRouter()
    writes = {"dependencies": access.write, "responses": {**RESPONSES, **access.write_responses}}

    def store_of(request: Request) -> VectorStore:
        return request.app.state.store

    async def call(fn, *args):
        """A vector-store call, in the thread pool, timed as the ``store`` stage."""
        with inference.metrics.stage("store"):
            return await run_in_threadpool(fn, *args)

    def check_model(info: CollectionInfo) -> None:
        if (info.model, info.dim) != (card.name, card.embed_dim):
            raise ApiError(409, "model_mismatch",
                           f"collection {info.name!r} holds embeddings of model {info.model!r} (dim {info.dim}); "
                           f"this gateway serves {card.name!r} (dim {card.embed_dim}). Embeddings of different "
                           f"models are not comparable: search it with raw vectors, serve {info.model!r}, or "
                           f"index the images into a new collection.")

    async def embed(images: list[bytes]) -> np.ndarray:
        if len(images) > settings.max_images_per_request:
            raise too_large(f"{len(images)} images in one request; the limit is {settings.max_images_per_request}")
        async with inference.slot():
            vectors = (await inference.run(await inference.pixel_batch(images), ("embedding",)))["embedding"]
        with inference.metrics.stage("postprocess"):
            vectors = vectors.astype(np.float32)
            return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    async def query_vectors(info: CollectionInfo, images: list[bytes] | None, vectors: list | None,
                            single: bool = False) -> np.ndarray:
        if images is not None:
            check_model(info)
            return await embed(images)
        if len(vectors) > MAX_VECTORS:
            raise too_large(f"{len(vectors)} vectors in one request; the limit is {MAX_VECTORS}")
        return _matrix(vectors, info.dim, "vector" if single else "vectors", single)

    @router.put("/v1/collections/{name}", response_model=CollectionResponse, status_code=201, **writes,
                openapi_extra=_request_body(CreateCollectionRequest, required=False), tags=["collections"])
    async def create_collection(name: CollectionName, request: Request) -> CollectionResponse:
        """Create a collection for the served model's embeddings (409 if it exists)."""
        check_name(name)
        body = await request.body()
        try:
            spec = CreateCollectionRequest.model_validate_json(body) if body.strip() else CreateCollectionRequest()
        except ValidationError as exc:
            raise validation_error(exc) from None
        options = (spec.hnsw or HnswOptions()).model_dump() if spec.index == "hnsw" else {}
        info = await call(store_of(request).create_collection, name, card.name, card.embed_dim,
                          IndexConfig(spec.index, **options))
        return _collection_response(info)

    @router.get("/v1/collections", response_model=CollectionList, tags=["collections"])
    async def list_collections(request: Request) -> CollectionList:
        """Every collection, with its model, dimension, index and item count."""
        return CollectionList(data=[_collection_response(i) for i in await call(store_of(request).list_collections)])

    @router.get("/v1/collections/{name}", response_model=CollectionResponse, responses=RESPONSES,
                tags=["collections"])
    async def describe_collection(name: CollectionName, request: Request) -> CollectionResponse:
        return _collection_response(await call(store_of(request).describe, check_name(name)))

    @router.delete("/v1/collections/{name}", tags=["collections"], **writes)
    async def drop_collection(name: CollectionName, request: Request) -> dict:
        """Delete a collection and all its items."""
        await call(store_of(request).drop_collection, check_name(name))
        return {"name": name, "deleted": True}

    async def read_items(request: Request) -> list[_NewItem]:
        """The items of an add request, from JSON or multipart."""
        if body_kind(request, settings) == "multipart":
            form = await read_form(request, max_files=settings.max_images_per_request + 1)
            files = _files(form, "images", "image")
            if not files:
                raise ApiError(422, "validation_error", "multipart body has no file parts named 'images'")
            if len(files) > settings.max_images_per_request:
                raise too_large(f"{len(files)} images in one request; the limit is {settings.max_images_per_request}")
            metadata = [{} if m is None else _parse_json(m, "metadata")
                        for m in _per_file(form, "metadata", len(files))]
            fields = [validate(_MultipartItemFields, {"id": i, "label": lab, "metadata": m}) for i, lab, m in
                      zip(_per_file(form, "id", len(files)), _per_file(form, "label", len(files)), metadata)]
            return [_NewItem(f.id, await file.read(), None, f.label, f.metadata) for f, file in zip(fields, files)]
        parsed = await read_json(request, settings, AddItemsRequest)
        if len(parsed.items) > MAX_VECTORS:
            raise too_large(f"{len(parsed.items)} items in one request; the limit is {MAX_VECTORS}")
        return [_NewItem(it.id, None if it.image is None else decode_base64(it.image.data, f"items[{n}].image.data"),
                         it.vector, it.label, it.metadata) for n, it in enumerate(parsed.items)]

    @router.post("/v1/collections/{name}/items", response_model=AddItemsResponse, **writes,
                 openapi_extra=_request_body(AddItemsRequest, {
                     "images": IMAGE_FILES, "id": {"type": "array", "items": {"type": "string"}},
                     "label": {"type": "array", "items": {"type": "string"}},
                     "metadata": {"type": "array", "items": JSON_TEXT}}),
                 tags=["collections"])
    async def add_items(name: CollectionName, request: Request) -> AddItemsResponse:
        """Add images (embedded through Triton) or raw vectors; an item with an existing id replaces it.
        JSON ``{"items": [...]}``, or multipart: file parts ``images`` with ``id``, ``label`` and ``metadata``
        (JSON) fields, each given once per image or (label, metadata) once for all."""
        store = store_of(request)
        info = await call(store.describe, check_name(name))
        entries = await read_items(request)
        ids = [entry.id for entry in entries if entry.id is not None]
        if len(set(ids)) != len(ids):
            raise ApiError(422, "validation_error", "an id appears twice in one request")
        for i, entry in enumerate(entries):
            if len(json.dumps(entry.metadata)) > 65536:
                raise ApiError(422, "validation_error", f"items[{i}].metadata is over 64 KiB of JSON")
        vectors: list[np.ndarray | None] = [None] * len(entries)
        images = [i for i, entry in enumerate(entries) if entry.image is not None]
        if images:
            check_model(info)
            for i, vector in zip(images, await embed([entries[i].image for i in images])):
                vectors[i] = vector
        for i, entry in enumerate(entries):
            if entry.vector is not None:
                vectors[i] = _matrix([entry.vector], info.dim, f"items[{i}].vector", single=True)[0]
        items = [Item(entry.id or uuid.uuid4().hex, vector, entry.label, entry.metadata)
                 for entry, vector in zip(entries, vectors)]
        result = await call(store.upsert, name, items)
        return AddItemsResponse(collection=name, ids=[item.id for item in items], added=result.added,
                                updated=result.updated, unchanged=result.unchanged)

    @router.get("/v1/collections/{name}/items", response_model=ItemList, responses=RESPONSES, tags=["collections"])
    async def list_items(name: CollectionName, request: Request, cursor: str | None = None,
                         limit: int = Query(100, ge=1, le=1000)) -> ItemList:
        """Items (ids, labels, metadata; no vectors), a page at a time: pass ``next`` back as ``cursor``."""
        page = await call(store_of(request).list_items, check_name(name), cursor, limit)
        return ItemList(data=[ItemSummary(id=i.id, label=i.label, metadata=i.metadata) for i in page.items],
                        next=page.next)

    @router.get("/v1/collections/{name}/items/{item_id:path}", response_model=ItemResponse,
                responses=RESPONSES, tags=["collections"])
    async def get_item(name: CollectionName, item_id: str, request: Request, vector: bool = True) -> ItemResponse:
        """One item; ``?vector=false`` leaves out its vector (null)."""
        item = await call(store_of(request).get, check_name(name), item_id)
        return ItemResponse(id=item.id, label=item.label, metadata=item.metadata,
                            vector=item.vector.tolist() if vector else None)

    @router.delete("/v1/collections/{name}/items/{item_id:path}", tags=["collections"], **writes)
    async def delete_item(name: CollectionName, item_id: str, request: Request) -> dict:
        await call(store_of(request).delete, check_name(name), item_id)
        return {"id": item_id, "deleted": True}

    async def read_search(request: Request) -> tuple[SearchRequest, list[bytes] | None, bool]:
        """The parsed request, its images' bytes, and whether it asked for one query (``results``)."""
        if body_kind(request, settings) == "multipart":
            form = await read_form(request, max_files=settings.max_images_per_request + 1)
            single, several = _files(form, "image"), _files(form, "images")
            if len(single) + len(several) == 0 or (single and several) or len(single) > 1:
                raise ApiError(422, "validation_error",
                               "multipart search needs one file part 'image' or file parts 'images'")
            options = {k: v for k, v in form.items() if k not in ("image", "images", "filter")}
            parsed = validate(SearchRequest, {**options, "filter": _json_field(form, "filter"),
                                              ("image" if single else "images"): ({"data": ""} if single
                                                                                  else [{"data": ""}])})
            return parsed, [await f.read() for f in single or several], bool(single)
        parsed = await read_json(request, settings, SearchRequest)
        images = None
        if parsed.image is not None:
            images = [decode_base64(parsed.image.data, "image.data")]
        elif parsed.images is not None:
            images = [decode_base64(im.data, f"images[{i}].data") for i, im in enumerate(parsed.images)]
        return parsed, images, parsed.images is None and parsed.vectors is None and parsed.ids is None

    @router.post("/v1/collections/{name}/search", response_model=SearchResponse, response_model_exclude_none=True,
                 responses=RESPONSES, tags=["collections"], openapi_extra=_request_body(SearchRequest, {
                     "image": {"type": "string", "format": "binary"}, "images": IMAGE_FILES,
                     "k": {"type": "integer"}, "filter": JSON_TEXT}))
    async def search(name: CollectionName, request: Request) -> SearchResponse:
        """The ``k`` items most cosine-similar to an image, a vector or a stored item (itself left out),
        optionally filtered by label and metadata; ``images``, ``vectors`` or ``ids`` for a batch."""
        store = store_of(request)
        info = await call(store.describe, check_name(name))
        parsed, images, single = await read_search(request)
        ids = [parsed.id] if parsed.id is not None else parsed.ids
        if ids is not None:
            if len(ids) > MAX_VECTORS:
                raise too_large(f"{len(ids)} ids in one request; the limit is {MAX_VECTORS}")
            queries = np.stack([(await call(store.get, name, item_id)).vector for item_id in ids])
        else:
            vectors = [parsed.vector] if parsed.vector is not None else parsed.vectors
            queries = await query_vectors(info, images, vectors, single=parsed.vector is not None)
        extra = 1 if ids is not None else 0  # the stored item finds itself first
        found = await call(store.search, name, queries, min(parsed.k + extra, MAX_K + 1), _where(parsed.filter))
        if ids is not None:
            found = [[h for h in hits if h.id != item_id][:parsed.k] for hits, item_id in zip(found, ids)]
        if single:
            return SearchResponse(results=_hits(found[0]))
        return SearchResponse(data=[SearchResults(index=i, results=_hits(h)) for i, h in enumerate(found)])

    async def read_classify(request: Request) -> tuple[ClassifyRequest, list[bytes] | None]:
        if body_kind(request, settings) == "multipart":
            form = await read_form(request, max_files=settings.max_images_per_request + 1)
            files = _files(form, "images", "image")
            if not files:
                raise ApiError(422, "validation_error", "multipart body has no file parts named 'images'")
            options = {k: v for k, v in form.items() if k not in ("image", "images", "filter")}
            parsed = validate(ClassifyRequest, {**options, "filter": _json_field(form, "filter"),
                                                "images": [{"data": ""}]})
            return parsed, [await f.read() for f in files]
        parsed = await read_json(request, settings, ClassifyRequest)
        images = None
        if parsed.images is not None:
            images = [decode_base64(im.data, f"images[{i}].data") for i, im in enumerate(parsed.images)]
        return parsed, images

    @router.post("/v1/classify", response_model=ClassifyResponse, responses=RESPONSES, tags=["classification"],
                 openapi_extra=_request_body(ClassifyRequest, {
                     "images": IMAGE_FILES, "collection": {"type": "string"}, "k": {"type": "integer"},
                     "temperature": {"type": "number"}, "top": {"type": "integer"}, "filter": JSON_TEXT}))
    async def classify(request: Request) -> ClassifyResponse:
        """DINO's weighted k-NN: the ``k`` labelled items most similar to each image or vector vote for their
        label with weight ``exp(cosine / T)``; labels are returned with their share of the votes."""
        store = store_of(request)
        parsed, images = await read_classify(request)
        info = await call(store.describe, check_name(parsed.collection))
        queries = await query_vectors(info, images, parsed.vectors)
        found = await call(store.search, info.name, queries, parsed.k, _where(parsed.filter, labelled=True))
        if not all(found):
            raise ApiError(422, "no_labelled_items",
                           f"collection {info.name!r} has no labelled items" + (" matching the filter"
                                                                                 if parsed.filter else ""))
        data = []
        for i, hits in enumerate(found):
            shares = label_shares(np.array([h.score for h in hits]), [h.label for h in hits], parsed.temperature)
            data.append(Classification(index=i, label=shares[0][0], neighbors=_hits(hits),
                                       scores=[ClassScore(label=lab, score=s) for lab, s in shares[:parsed.top]]))
        return ClassifyResponse(collection=info.name, k=max(len(h) for h in found), temperature=parsed.temperature,
                                data=data)

    return router
