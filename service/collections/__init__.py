"""Persistent, named collections of embeddings: the store behind search and k-NN classification."""

from __future__ import annotations

from pathlib import Path

from ..settings import STORE_FORMS
from .base import (
    NAME_PATTERN, CollectionInfo, Hit, IndexConfig, Item, ItemFilter, ItemPage, UpsertResult, VectorStore,
    check_name,
)

__all__ = [
    "NAME_PATTERN", "STORE_FORMS", "CollectionInfo", "Hit", "IndexConfig", "Item", "ItemFilter", "ItemPage",
    "UpsertResult", "VectorStore", "check_name", "open_store",
]


def open_store(spec: str, data_dir: Path) -> VectorStore:
    """The store a ``vector_store`` setting names (its form is checked by :class:`service.settings.Settings`).

    ``embedded`` (default): SQLite + FAISS in ``DATA_DIR/collections``. ``qdrant://HOST:PORT`` (or
    ``qdrants://`` for TLS): a Qdrant server's REST endpoint. ``qdrant-local``: qdrant-client's local
    mode in ``DATA_DIR/qdrant`` (brute force; tests and trials).
    """
    if spec == "embedded":
        from .embedded import EmbeddedStore

        return EmbeddedStore(Path(data_dir) / "collections")
    if spec == "qdrant-local":
        from .qdrant import QdrantStore

        return QdrantStore.open_local(str(Path(data_dir) / "qdrant"))
    for scheme, http in (("qdrant://", "http://"), ("qdrants://", "https://")):
        if spec.startswith(scheme) and len(spec) > len(scheme):
            from .qdrant import QdrantStore

            return QdrantStore.connect(http + spec[len(scheme):])
    raise ValueError(f"vector store {spec!r}: use {STORE_FORMS}")
