"""The embedded store's own rules, in process: one owner per directory, the saved HNSW graph caught up,
compacted or rebuilt from SQLite when it opens."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from collections_helpers import top_k
from service.collections import IndexConfig, Item, ItemFilter
from service.collections.embedded import EmbeddedStore
from service.metrics import GatewayMetrics
from service.routes import collections as collection_routes
from service.routes import items as item_routes
from service.routes.common import AsyncStore

DIM = 16


def vectors(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)


def fill(store: EmbeddedStore, start: int, values: np.ndarray) -> list[str]:
    ids = [f"i{start + n}" for n in range(len(values))]
    store.upsert("c", [Item(i, v) for i, v in zip(ids, values)])
    return ids


def assert_searches_like_brute_force(store: EmbeddedStore, ids: list[str], values: np.ndarray) -> None:
    for query in vectors(99, 3):
        got = [(h.id, h.score) for h in store.search("c", query[None], 10, ItemFilter())[0]]
        expected = top_k(query, ids, values, 10)
        assert [i for i, _ in got] == [i for i, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


def test_a_second_process_cannot_open_the_same_directory(tmp_path):
    store = EmbeddedStore(tmp_path)
    with pytest.raises(RuntimeError, match="in use by another dinoserve process"):
        EmbeddedStore(tmp_path)
    store.close()
    EmbeddedStore(tmp_path).close()


def test_saved_graph_is_caught_up_and_compacted_when_a_fifth_of_it_is_deleted(tmp_path):
    store = EmbeddedStore(tmp_path)
    store.create_collection("c", "m", DIM, IndexConfig("hnsw"))
    ids, values = fill(store, 0, vectors(0, 100)), vectors(0, 100)
    store.close()
    saved = list((tmp_path / "indexes").glob("*.faiss"))
    assert len(saved) == 1 and saved[0].stem.endswith("-100")  # watermark: the largest row key

    store = EmbeddedStore(tmp_path)
    for n in range(30):  # 30 % of the graph's nodes become tombstones
        store.delete("c", f"i{n}")
    store.close()
    store = EmbeddedStore(tmp_path)
    assert store.describe("c").count == 70
    assert store._collections["c"].index.tombstones == 0  # rebuilt from SQLite's 70 rows
    assert_searches_like_brute_force(store, ids[30:], values[30:])
    store.close()


def test_an_unreadable_saved_graph_is_rebuilt_from_sqlite(tmp_path, caplog):
    store = EmbeddedStore(tmp_path)
    store.create_collection("c", "m", DIM, IndexConfig("hnsw"))
    ids, values = fill(store, 0, vectors(1, 40)), vectors(1, 40)
    store.close()
    (saved,) = (tmp_path / "indexes").glob("*.faiss")
    saved.write_bytes(b"truncated")

    store = EmbeddedStore(tmp_path)
    assert "unreadable" in caplog.text
    assert store.describe("c").count == 40
    assert_searches_like_brute_force(store, ids, values)
    store.close()


def test_dropping_a_collection_removes_its_rows_and_saved_graph(tmp_path):
    store = EmbeddedStore(tmp_path)
    store.create_collection("c", "m", DIM, IndexConfig("hnsw"))
    fill(store, 0, vectors(2, 10))
    store.close()
    store = EmbeddedStore(tmp_path)
    store.drop_collection("c")
    assert not list((tmp_path / "indexes").glob("*.faiss"))
    store.create_collection("c", "m", DIM, IndexConfig("exact"))
    assert store.describe("c").count == 0
    store.close()


def test_collection_route_handlers_run_alone_on_a_store(tmp_path):
    """The handlers are plain functions of their dependencies: no app, no HTTP, the store on disk."""
    store = EmbeddedStore(tmp_path)
    store.create_collection("shapes", "m", DIM, IndexConfig())
    ids = [f"s{n}" for n in range(5)]
    store.upsert("shapes", [Item(i, v, "shape") for i, v in zip(ids, vectors(2, 5))])
    timed = AsyncStore(store, GatewayMetrics(1))

    async def calls():
        described = await collection_routes.describe_collection("shapes", timed)
        item = await item_routes.get_item("shapes", ids[3], timed, vector=False)
        dropped = await collection_routes.drop_collection("shapes", timed)
        return described, item, dropped, await collection_routes.list_collections(timed)

    described, item, dropped, listed = asyncio.run(calls())
    assert (described.name, described.model, described.dim, described.count) == ("shapes", "m", DIM, 5)
    assert item.id == ids[3] and item.vector is None
    assert dropped == {"name": "shapes", "deleted": True} and listed.data == []
    store.close()
