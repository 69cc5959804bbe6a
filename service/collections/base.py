"""What every vector store offers the API: named collections of L2-normalised vectors with ids, an
optional label and JSON metadata, searched by cosine similarity.

One interface, one module per engine (``embedded``: SQLite + FAISS in a data directory; ``qdrant``: a
Qdrant server, or qdrant-client's local mode). Errors are :class:`~service.errors.ApiError` with the
statuses of docs/api.md (404 unknown collection or id, 409 existing collection, 422 bad vectors), so the
API passes them through unchanged.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import ApiError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
IndexKind = Literal["exact", "hnsw"]
MetadataValue = str | int | bool


@dataclass(frozen=True)
class IndexConfig:
    """How a collection is searched. ``exact`` compares the query with every vector (recall 1);
    ``hnsw`` walks a HNSW graph: ``m`` links per node and ``ef_construction`` candidates while building
    (graph quality), ``ef_search`` candidates per query (recall against speed; docs/benchmarks.md)."""

    kind: IndexKind = "exact"
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 96

    def to_dict(self) -> dict:
        if self.kind == "exact":
            return {"kind": "exact"}
        return {"kind": "hnsw", "m": self.m, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    @classmethod
    def from_dict(cls, values: dict) -> "IndexConfig":
        return cls(**values)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    model: str  # the model whose embeddings the collection holds
    dim: int
    index: IndexConfig
    created_at: str  # ISO 8601, UTC
    count: int = 0
    metric: str = "cosine"


@dataclass(frozen=True)
class Item:
    id: str
    vector: np.ndarray  # float32 (dim,), L2-normalised
    label: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity to the query
    label: str | None
    metadata: dict


@dataclass(frozen=True)
class ItemFilter:
    """Equality on the label and on metadata keys (a metadata list matches when it holds the value, as in
    Qdrant); ``labelled`` keeps only items that have a label (k-NN classification)."""

    label: str | None = None
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    labelled: bool = False

    def __bool__(self) -> bool:
        return self.label is not None or bool(self.metadata) or self.labelled


@dataclass(frozen=True)
class UpsertResult:
    added: int
    updated: int
    unchanged: int


@dataclass(frozen=True)
class ItemPage:
    items: list[Item]
    next: str | None  # cursor of the following page; None on the last


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ApiError(422, "invalid_collection_name",
                       f"collection name {name!r} must match [a-z0-9][a-z0-9_-]{{0,63}}")
    return name


def collection_not_found(name: str) -> ApiError:
    return ApiError(404, "collection_not_found", f"collection {name!r} does not exist")


def item_not_found(name: str, item_id: str) -> ApiError:
    return ApiError(404, "item_not_found", f"collection {name!r} has no item {item_id!r}")


def collection_exists(name: str) -> ApiError:
    return ApiError(409, "collection_exists", f"collection {name!r} already exists")


def normalized(vectors: np.ndarray, dim: int, what: str = "vector") -> np.ndarray:
    """``(n, dim)`` float32 rows scaled to unit length; 422 for another dimension or a zero vector."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        got = vectors.shape[-1] if vectors.ndim else 0
        raise ApiError(422, "wrong_dimension", f"{what} has dimension {got}; the collection's is {dim}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ApiError(422, "invalid_vector", f"a {what} is zero or not finite: cosine similarity is undefined")
    return vectors / norms


class VectorStore(ABC):
    """Collections of vectors. Methods are blocking and thread-safe; writes are durable when they
    return."""

    @abstractmethod
    def create_collection(self, name: str, model: str, dim: int, index: IndexConfig) -> CollectionInfo:
        """409 when ``name`` exists."""

    @abstractmethod
    def list_collections(self) -> list[CollectionInfo]: ...

    @abstractmethod
    def describe(self, name: str) -> CollectionInfo:
        """404 when ``name`` does not exist."""

    @abstractmethod
    def drop_collection(self, name: str) -> None: ...

    @abstractmethod
    def upsert(self, name: str, items: list[Item]) -> UpsertResult:
        """Add items (distinct ids), replacing those with the same id; an item equal to the stored one is
        left alone. The embedded store writes all or none."""

    @abstractmethod
    def get(self, name: str, item_id: str) -> Item: ...

    def get_many(self, name: str, item_ids: list[str]) -> list[Item]:
        """The items ``item_ids`` in that order (404 naming the first missing one): one call where a request
        names a batch, so the gateway makes one thread-pool hop for it, not one per id."""
        return [self.get(name, item_id) for item_id in item_ids]

    @abstractmethod
    def delete(self, name: str, item_id: str) -> None: ...

    @abstractmethod
    def list_items(self, name: str, cursor: str | None, limit: int) -> ItemPage:
        """Items without their vectors, ``limit`` at a time, from ``cursor`` (None: the first page)."""

    @abstractmethod
    def search(self, name: str, queries: np.ndarray, k: int, where: ItemFilter) -> list[list[Hit]]:
        """The ``k`` items most cosine-similar to each query ``(n, dim)`` that pass ``where``, best first."""

    @abstractmethod
    def close(self) -> None: ...
