"""One collection's vectors in a FAISS index, under the store's int64 row keys.

``exact``: ``IndexFlatIP`` (every vector compared; on unit vectors the inner product is the cosine).
``hnsw``: ``IndexHNSWFlat`` (Malkov & Yashunin, 2018). HNSW graphs cannot drop nodes, so deleted keys
become tombstones that searches skip (an ``IDSelector``); the store rebuilds a graph whose tombstones
pass :data:`COMPACT_FRACTION` when it opens.

Not thread-safe: the embedded store serialises calls per collection.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from core.knn import nearest

from .base import IndexConfig

# faiss 1.15 computes inner products of query batches below this size without BLAS, which made
# exact search much slower for single queries (docs/benchmarks.md, "Retrieval").
faiss.cvar.distance_compute_blas_threshold = 20
COMPACT_FRACTION = 0.2


class FaissIndex:
    def __init__(self, dim: int, config: IndexConfig, index: faiss.Index | None = None):
        self.dim = dim
        self.config = config
        self._index = index if index is not None else self._empty()
        self._deleted: set[int] = set()
        ids = self._ids()
        self.watermark = int(ids.max()) if len(ids) else 0  # the largest key ever added

    def _empty(self) -> faiss.Index:
        if self.config.kind == "exact":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        graph = faiss.IndexHNSWFlat(self.dim, self.config.m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.config.ef_construction
        return faiss.IndexIDMap2(graph)

    def _ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def __len__(self) -> int:
        return self._index.ntotal - len(self._deleted)

    @property
    def tombstones(self) -> int:
        return len(self._deleted)

    def keys(self) -> np.ndarray:
        """Keys of the live vectors."""
        ids = self._ids()
        if self._deleted:
            ids = ids[~np.isin(ids, np.fromiter(self._deleted, dtype=np.int64))]
        return ids

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add unit vectors ``(n, dim)`` under new ``keys``, each larger than every key added before."""
        if len(keys):
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(keys, np.int64))
            self.watermark = max(self.watermark, int(np.max(keys)))

    def remove(self, keys: np.ndarray) -> None:
        """Forget ``keys`` (each of them in the index)."""
        if not len(keys):
            return
        if self.config.kind == "exact":
            self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(keys, dtype=np.int64)))
        else:
            self._deleted.update(int(k) for k in keys)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` ``(key, cosine)`` pairs, best first, among ``allowed`` keys if given."""
        available = len(self) if allowed is None else len(allowed)
        if available == 0:
            return [[] for _ in queries]
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
        elif self._deleted:
            excluded = faiss.IDSelectorBatch(np.fromiter(self._deleted, dtype=np.int64))
            selector = faiss.IDSelectorNot(excluded)
        if self.config.kind == "exact":
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
        else:
            params = faiss.SearchParametersHNSW(efSearch=max(self.config.ef_search, k))
            if selector is not None:
                params.sel = selector
        scores, keys = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        results = [[(int(key), float(s)) for key, s in zip(row_keys, row_scores) if key >= 0]
                   for row_keys, row_scores in zip(keys, scores)]
        if allowed is not None and any(len(r) < min(k, available) for r in results):
            # A graph walk meets too few items of a small filtered subset: compare with all of them.
            results = self._exact_among(queries, k, np.asarray(allowed, dtype=np.int64))
        return results

    def _exact_among(self, queries: np.ndarray, k: int, keys: np.ndarray) -> list[list[tuple[int, float]]]:
        vectors = self._index.reconstruct_batch(keys)
        scores, positions = nearest(np.asarray(queries, dtype=np.float32), vectors, min(k, len(keys)))
        return [[(int(keys[p]), float(s)) for p, s in zip(row_p, row_s)] for row_p, row_s in zip(positions, scores)]

    def save(self, path: Path) -> None:
        """Write the index (tombstones included: whoever loads it removes what its source no longer has)."""
        faiss.write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, dim: int, config: IndexConfig) -> "FaissIndex":
        index = faiss.read_index(str(path))
        if index.d != dim:
            raise ValueError(f"{path} holds vectors of dimension {index.d}, not {dim}")
        if config.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efConstruction = config.ef_construction
        return cls(dim, config, index)
