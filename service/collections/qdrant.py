"""Collections in Qdrant, for deployments that outgrow one machine (``DINOSERVE_VECTOR_STORE=
qdrant://host:port``), or in qdrant-client's local mode (``qdrant-local``: brute force in NumPy, for
tests and trials only).

Each collection is a Qdrant collection of the same name with cosine distance; its model, dimension
and index settings travel in the collection's metadata (Qdrant 1.16 or later), and collections without
them are not ours and stay invisible. A point's id is a UUID derived from the caller's id, which the
payload keeps with the label and metadata: ``{"id", "label", "metadata"}``; filters become payload
filters on ``label`` and ``metadata.<key>``. ``exact`` collections build no graph (``m = 0``) and are
searched with ``exact=True``; ``hnsw`` ones use Qdrant's HNSW with the collection's settings. Writes
wait for Qdrant's acknowledgement (its WAL) before they return.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ..errors import ApiError
from .base import (
    CollectionInfo, Hit, IndexConfig, Item, ItemFilter, ItemPage, UpsertResult, VectorStore, check_name,
    collection_exists, collection_not_found, item_not_found, normalized,
)

ID_NAMESPACE = uuid.UUID("6f1c5a52-3d0e-4c55-9a7e-1d2f0b8a9c31")
METADATA_KEY = "dinoserve"


def point_id(item_id: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, item_id))


class QdrantStore(VectorStore):
    def __init__(self, client: QdrantClient, local: bool, where: str):
        self.client = client
        self.local = local
        self.where = where
        # Local mode is one in-process object over SQLite; the HTTP client is safe to share.
        self._lock = threading.Lock() if local else nullcontext()

    @classmethod
    def connect(cls, url: str) -> "QdrantStore":
        return cls(QdrantClient(url=url, check_compatibility=False), local=False, where=url)

    @classmethod
    def open_local(cls, path: str) -> "QdrantStore":
        return cls(QdrantClient(path=path, force_disable_check_same_thread=True), local=True, where=path)

    @contextmanager
    def _call(self, name: str | None = None) -> Iterator[None]:
        """One exchange with Qdrant: an unknown collection is 404, an unreachable or failing Qdrant 503."""
        try:
            with self._lock:
                yield
        except UnexpectedResponse as exc:
            if exc.status_code == 404 and name is not None:
                raise collection_not_found(name) from None
            raise ApiError(503, "vector_store_error",
                           f"Qdrant at {self.where} answered {exc.status_code}: {exc.content[:200]!r}") from None
        except (ResponseHandlingException, httpx.HTTPError, OSError) as exc:
            raise ApiError(503, "vector_store_unavailable", f"Qdrant at {self.where} is unreachable: {exc}") from None
        except ValueError as exc:  # local mode's "Collection ... not found"
            if name is not None and "not found" in str(exc):
                raise collection_not_found(name) from None
            raise

    def _info(self, name: str, count: bool = False) -> CollectionInfo:
        with self._call(name):
            config = self.client.get_collection(name).config
            total = self.client.count(name, exact=True).count if count else 0
        ours = (config.metadata or {}).get(METADATA_KEY)
        if ours is None:
            raise collection_not_found(name)
        return CollectionInfo(name, ours["model"], ours["dim"], IndexConfig.from_dict(ours["index"]),
                              ours["created_at"], count=total)

    def create_collection(self, name: str, model: str, dim: int, index: IndexConfig) -> CollectionInfo:
        check_name(name)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        info = CollectionInfo(name, model, dim, index, created)
        metadata = {METADATA_KEY: {"model": model, "dim": dim, "index": index.to_dict(), "created_at": created}}
        graph = (models.HnswConfigDiff(m=0) if index.kind == "exact"
                 else models.HnswConfigDiff(m=index.m, ef_construct=index.ef_construction))
        with self._call():
            if self.client.collection_exists(name):
                raise collection_exists(name)
            try:
                self.client.create_collection(
                    name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                    hnsw_config=graph, metadata=metadata)
            except UnexpectedResponse as exc:
                if exc.status_code == 409:  # created by another gateway since the check
                    raise collection_exists(name) from None
                raise
            if not self.local:  # local mode has no payload indexes
                for field in ("id", "label"):
                    self.client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD)
        return info

    def list_collections(self) -> list[CollectionInfo]:
        with self._call():
            names = sorted(c.name for c in self.client.get_collections().collections)
        found = []
        for name in names:
            try:
                found.append(self._info(name, count=True))
            except ApiError as exc:
                if exc.status != 404:  # dropped meanwhile, or not ours
                    raise
        return found

    def describe(self, name: str) -> CollectionInfo:
        return self._info(name, count=True)

    def drop_collection(self, name: str) -> None:
        self._info(name)
        with self._call(name):
            self.client.delete_collection(name)

    def _retrieve(self, name: str, ids: list[str], with_vectors: bool) -> dict[str, models.Record]:
        with self._call(name):
            records = self.client.retrieve(name, [point_id(i) for i in ids], with_payload=True,
                                           with_vectors=with_vectors)
        return {r.payload["id"]: r for r in records}

    def upsert(self, name: str, items: list[Item]) -> UpsertResult:
        """``items`` have distinct ids."""
        info = self._info(name)
        vectors = normalized(np.stack([item.vector for item in items]), info.dim)
        stored = self._retrieve(name, [item.id for item in items], with_vectors=True)
        points, added, updated, unchanged = [], 0, 0, 0
        for item, vector in zip(items, vectors):
            payload = {"id": item.id, "metadata": item.metadata}
            if item.label is not None:
                payload["label"] = item.label
            old = stored.get(item.id)
            if old is not None and old.payload == payload and np.allclose(old.vector, vector, rtol=0, atol=1e-6):
                unchanged += 1
                continue
            added, updated = (added + 1, updated) if old is None else (added, updated + 1)
            points.append(models.PointStruct(id=point_id(item.id), vector=vector.tolist(), payload=payload))
        if points:
            with self._call(name):
                self.client.upsert(name, points, wait=True)
        return UpsertResult(added, updated, unchanged)

    @staticmethod
    def _item(record, with_vector: bool = True) -> Item:
        vector = np.asarray(record.vector, dtype=np.float32) if with_vector else np.empty(0, np.float32)
        return Item(record.payload["id"], vector, record.payload.get("label"), record.payload.get("metadata", {}))

    def get(self, name: str, item_id: str) -> Item:
        self._info(name)
        record = self._retrieve(name, [item_id], with_vectors=True).get(item_id)
        if record is None:
            raise item_not_found(name, item_id)
        return self._item(record)

    def delete(self, name: str, item_id: str) -> None:
        self._info(name)
        if item_id not in self._retrieve(name, [item_id], with_vectors=False):
            raise item_not_found(name, item_id)
        with self._call(name):
            self.client.delete(name, models.PointIdsList(points=[point_id(item_id)]), wait=True)

    def list_items(self, name: str, cursor: str | None, limit: int) -> ItemPage:
        self._info(name)
        with self._call(name):
            records, following = self.client.scroll(name, limit=limit, offset=cursor or None, with_payload=True)
        return ItemPage([self._item(r, with_vector=False) for r in records],
                        None if following is None else str(following))

    @staticmethod
    def _filter(where: ItemFilter) -> models.Filter | None:
        if not where:
            return None
        must = [models.FieldCondition(key=f"metadata.{key}", match=models.MatchValue(value=value))
                for key, value in where.metadata.items()]
        if where.label is not None:
            must.append(models.FieldCondition(key="label", match=models.MatchValue(value=where.label)))
        must_not = [models.IsEmptyCondition(is_empty=models.PayloadField(key="label"))] if where.labelled else []
        return models.Filter(must=must or None, must_not=must_not or None)

    def search(self, name: str, queries: np.ndarray, k: int, where: ItemFilter) -> list[list[Hit]]:
        info = self._info(name)
        queries = normalized(queries, info.dim, "query vector")
        # Local mode always compares every vector and warns about search parameters.
        params = None if self.local else models.SearchParams(
            exact=info.index.kind == "exact", hnsw_ef=max(info.index.ef_search, k))
        requests = [models.QueryRequest(query=q.tolist(), limit=k, filter=self._filter(where), params=params,
                                        with_payload=True) for q in queries]
        with self._call(name):
            responses = self.client.query_batch_points(name, requests)
        return [[Hit(p.payload["id"], float(p.score), p.payload.get("label"), p.payload.get("metadata", {}))
                 for p in response.points] for response in responses]

    def close(self) -> None:
        with self._lock:
            self.client.close()
