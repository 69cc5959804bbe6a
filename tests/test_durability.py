"""An acknowledged write survives SIGKILL: clients add and delete items concurrently, the gateway process
is killed without warning, and after a restart every acknowledged write is there, every request is
there whole or not at all, and searches answer as before (and as brute force over what is stored)."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import numpy as np

from collections_helpers import start_gateway, top_k, unit

DIM = 96
WRITERS = 6
PER_REQUEST = 5


def base_vectors(count: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(count, DIM))


def request_vectors(writer: int, number: int) -> np.ndarray:
    return np.random.default_rng([writer, number]).normal(size=(PER_REQUEST, DIM))


def request_ids(writer: int, number: int) -> list[str]:
    return [f"w{writer}-r{number}-{i}" for i in range(PER_REQUEST)]


def write_until_failure(url: str, writer: int, acknowledged: list, attempted: list, errors: list,
                        stop: threading.Event) -> None:
    """Alternate adds (one request of PER_REQUEST items, into one of the two collections) and deletes of
    "victim" items, recording each request before sending it and once it is acknowledged."""
    with httpx.Client(base_url=url, timeout=30) as client:
        number = 0
        while not stop.is_set():
            collection = ("flat", "graph")[number % 2]
            if number % 4 == 3:
                request = ("delete", collection, f"victim-{writer}-{number // 4}")
                attempted.append(request)
                send = lambda: client.delete(f"/v1/collections/{collection}/items/{request[2]}")  # noqa: E731
            else:
                request = ("add", collection, writer, number)
                attempted.append(request)
                items = [{"id": i, "vector": v.tolist(), "label": "new", "metadata": {"request": f"{writer}-{number}"}}
                         for i, v in zip(request_ids(writer, number), request_vectors(writer, number))]
                send = lambda: client.post(f"/v1/collections/{collection}/items", json={"items": items})  # noqa: E731
            try:
                response = send()
            except httpx.TransportError:
                return  # the server is gone
            if response.status_code != 200:
                errors.append(f"{request}: {response.status_code} {response.text}")
                return
            acknowledged.append(request)
            number += 1


def stored(api: httpx.Client, collection: str) -> list[str]:
    ids, cursor = [], None
    while True:
        body = api.get(f"/v1/collections/{collection}/items",
                       params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
        ids += [item["id"] for item in body["data"]]
        if not (cursor := body["next"]):
            return ids


def test_acknowledged_writes_survive_sigkill_of_the_server(server, bundle, tmp_path):
    data_dir = tmp_path / "data"
    gateway = start_gateway(server, bundle, tmp_path / "serve-1.log", data_dir)
    victims = [f"victim-{w}-{n}" for w in range(WRITERS) for n in range(100)]
    base = base_vectors(100 + len(victims))
    with httpx.Client(base_url=gateway.url, timeout=30) as api:
        for collection, index in (("flat", "exact"), ("graph", "hnsw")):
            assert api.put(f"/v1/collections/{collection}", json={"index": index}).status_code == 201
            items = [{"id": f"base-{n}", "vector": base[n].tolist(), "label": "base"} for n in range(100)]
            items += [{"id": v, "vector": base[100 + n].tolist(), "label": "victim"} for n, v in enumerate(victims)]
            assert api.post(f"/v1/collections/{collection}/items", json={"items": items}).status_code == 200
    assert gateway.stop() == 0  # a clean stop saves the HNSW graph; after the kill it is caught up from SQLite
    assert list((data_dir / "collections" / "indexes").glob("*.faiss"))

    gateway = start_gateway(server, bundle, tmp_path / "serve-2.log", data_dir)
    queries = np.random.default_rng(1).normal(size=(4, DIM))
    with httpx.Client(base_url=gateway.url, timeout=30) as api:
        def search_base(collection):
            return [api.post(f"/v1/collections/{collection}/search",
                             json={"vector": q.tolist(), "k": 10, "filter": {"label": "base"}}).json() for q in queries]
        before = {c: search_base(c) for c in ("flat", "graph")}

        acknowledged, attempted, errors, stop = [], [], [], threading.Event()
        writers = [threading.Thread(target=write_until_failure,
                                    args=(gateway.url, w, acknowledged, attempted, errors, stop))
                   for w in range(WRITERS)]
        for thread in writers:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        gateway.kill()  # SIGKILL while the writers are sending
        stop.set()
        for thread in writers:
            thread.join()
    assert not errors
    in_flight = [r for r in attempted if r not in acknowledged]
    assert len(acknowledged) >= 60 and in_flight, "the kill should land while requests are in flight"

    db = sqlite3.connect(data_dir / "collections" / "collections.sqlite3")  # as the kill left it
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()

    gateway = start_gateway(server, bundle, tmp_path / "serve-3.log", data_dir)
    with httpx.Client(base_url=gateway.url, timeout=30) as api:
        def item(collection, item_id):
            response = api.get(f"/v1/collections/{collection}/items/{item_id}")
            assert response.status_code in (200, 404), response.text
            return response.json() if response.status_code == 200 else None

        for request in acknowledged:
            if request[0] == "delete":
                assert item(request[1], request[2]) is None, f"acknowledged delete came back: {request}"
                continue
            _, collection, writer, number = request
            for item_id, vector in zip(request_ids(writer, number), request_vectors(writer, number)):
                got = item(collection, item_id)
                assert got is not None, f"acknowledged item lost: {collection}/{item_id}"
                assert (got["label"], got["metadata"]) == ("new", {"request": f"{writer}-{number}"})
                np.testing.assert_allclose(got["vector"], unit(vector), atol=1e-6)
        for request in in_flight:  # whole or absent, never part of a request
            if request[0] == "add":
                present = [item(request[1], i) is not None for i in request_ids(*request[2:])]
                assert all(present) or not any(present), f"half-written request {request}: {present}"

        assert {c: search_base(c) for c in ("flat", "graph")} == before
        vectors = {f"base-{n}": base[n] for n in range(100)} | {v: base[100 + n] for n, v in enumerate(victims)}
        for request in attempted:
            if request[0] == "add":
                vectors |= dict(zip(request_ids(*request[2:]), request_vectors(*request[2:])))
        for collection in ("flat", "graph"):
            ids = stored(api, collection)
            assert api.get(f"/v1/collections/{collection}").json()["count"] == len(ids)
            for query in queries:
                results = api.post(f"/v1/collections/{collection}/search",
                                   json={"vector": query.tolist(), "k": 10}).json()["results"]
                expected = top_k(query, ids, np.stack([vectors[i] for i in ids]), 10)
                assert [r["id"] for r in results] == [i for i, _ in expected]
                np.testing.assert_allclose([r["score"] for r in results], [s for _, s in expected], atol=1e-5)
    assert gateway.stop() == 0
