"""``/v1/collections/{name}/items``: add (images embedded through Triton, or raw vectors), list, get and
delete a collection's items."""

from __future__ import annotations

import json
import uuid

import numpy as np
from fastapi import APIRouter, Query, Request

from ..auth import Access
from ..collections import Item, check_name
from ..collections_schemas import AddItemsRequest, AddItemsResponse, ItemList, ItemResponse, ItemSummary
from ..errors import ApiError, too_large
from ..request_body import IMAGE_FILES, JSON_TEXT, Multipart, read_request, request_body
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

MAX_METADATA_BYTES = 65536
# File parts ``images`` (or ``image``), each an item; ``id`` once per image, ``label`` and ``metadata`` (JSON)
# once per image or once for all.
FORM = Multipart(files={"images": "items", "image": "items"}, items="items", per_image=("id",),
                 per_image_or_all=("label", "metadata"), json_fields=("metadata",))
TEXT_LIST = {"type": "array", "items": {"type": "string"}}
OPENAPI_BODY = request_body(AddItemsRequest, {"images": IMAGE_FILES, "id": TEXT_LIST, "label": TEXT_LIST,
                                              "metadata": {"type": "array", "items": JSON_TEXT}})


async def add_items(name: CollectionName, request: Request, settings: SettingsDep, card: CardDep,
                    inference: InferenceDep, store: StoreDep) -> AddItemsResponse:
    """Add images (embedded through Triton) or raw vectors; an item with an existing id replaces it.
    JSON ``{"items": [...]}``, or multipart: file parts ``images`` with ``id``, ``label`` and ``metadata``
    (JSON) fields, each given once per image or (label, metadata) once for all."""
    info = await store.describe(check_name(name))
    entries = (await read_request(request, settings, AddItemsRequest, FORM)).items
    if len(entries) > MAX_VECTORS:
        raise too_large(f"{len(entries)} items in one request; the limit is {MAX_VECTORS}")
    ids = [entry.id for entry in entries if entry.id is not None]
    if len(set(ids)) != len(ids):
        raise ApiError(422, "validation_error", "an id appears twice in one request")
    for i, entry in enumerate(entries):
        if len(json.dumps(entry.metadata)) > MAX_METADATA_BYTES:
            raise ApiError(422, "validation_error", f"items[{i}].metadata is over 64 KiB of JSON")
    vectors: list[np.ndarray | None] = [None] * len(entries)
    images = [i for i, entry in enumerate(entries) if entry.image is not None]
    if images:
        check_model(info, card)
        embedded = await inference.embed([entries[i].image.content for i in images], normalize=True)
        for i, vector in zip(images, embedded):
            vectors[i] = vector
    for i, entry in enumerate(entries):
        if entry.vector is not None:
            vectors[i] = matrix([entry.vector], info.dim, f"items[{i}].vector", single=True)[0]
    items = [Item(entry.id or uuid.uuid4().hex, vector, entry.label, entry.metadata)
             for entry, vector in zip(entries, vectors)]
    result = await store.upsert(name, items)
    return AddItemsResponse(collection=name, ids=[item.id for item in items], added=result.added,
                            updated=result.updated, unchanged=result.unchanged)


async def list_items(name: CollectionName, store: StoreDep, cursor: str | None = None,
                     limit: int = Query(100, ge=1, le=1000)) -> ItemList:
    """Items (ids, labels, metadata; no vectors), a page at a time: pass ``next`` back as ``cursor``."""
    page = await store.list_items(check_name(name), cursor, limit)
    return ItemList(data=[ItemSummary(id=i.id, label=i.label, metadata=i.metadata) for i in page.items],
                    next=page.next)


async def get_item(name: CollectionName, item_id: str, store: StoreDep, vector: bool = True) -> ItemResponse:
    """One item; ``?vector=false`` leaves out its vector (null)."""
    item = await store.get(check_name(name), item_id)
    return ItemResponse(id=item.id, label=item.label, metadata=item.metadata,
                        vector=item.vector.tolist() if vector else None)


async def delete_item(name: CollectionName, item_id: str, store: StoreDep) -> dict:
    await store.delete(check_name(name), item_id)
    return {"id": item_id, "deleted": True}


def add_routes(router: APIRouter, access: Access) -> None:
    writes = {"dependencies": access.write, "responses": {**RESPONSES, **access.write_responses}}
    router.add_api_route("/v1/collections/{name}/items", add_items, methods=["POST"],
                         response_model=AddItemsResponse, openapi_extra=OPENAPI_BODY, tags=["collections"], **writes)
    router.add_api_route("/v1/collections/{name}/items", list_items, methods=["GET"], response_model=ItemList,
                         responses=RESPONSES, tags=["collections"])
    router.add_api_route("/v1/collections/{name}/items/{item_id:path}", get_item, methods=["GET"],
                         response_model=ItemResponse, responses=RESPONSES, tags=["collections"])
    router.add_api_route("/v1/collections/{name}/items/{item_id:path}", delete_item, methods=["DELETE"],
                         tags=["collections"], **writes)
