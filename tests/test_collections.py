"""Collections over HTTP (the contract: docs/api.md): the same behaviour on every vector store, checked
against brute-force cosine search in NumPy. Each store runs in a real `dinoserve serve` process that
embeds images through the session server's Triton."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from collections_helpers import BACKENDS, b64, fast_data_dir, jpeg, start_gateway, top_k, unit
from service.collections import IndexConfig, Item, open_store

DIM = 96  # the tiny test model's embedding size


@pytest.fixture(scope="module", params=BACKENDS)
def api(request, server, bundle, tmp_path_factory):
    for data_dir in fast_data_dir(tmp_path_factory, request.param):
        # Written by "another gateway" serving another model of the same dimension.
        store = open_store(request.param, data_dir)
        store.create_collection("foreign", "other-model", DIM, IndexConfig())
        store.upsert("foreign", [Item("x", np.ones(DIM, np.float32), "thing")])
        store.close()
        log = tmp_path_factory.mktemp(f"collections-{request.param}") / "serve.log"
        gateway = start_gateway(server, bundle, log, data_dir, request.param)
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            yield client
        gateway.stop()


def create(api, name: str, **body) -> dict:
    response = api.put(f"/v1/collections/{name}", json=body or None)
    assert response.status_code == 201, response.text
    return response.json()


def add(api, name: str, items: list[dict]) -> dict:
    response = api.post(f"/v1/collections/{name}/items", json={"items": items})
    assert response.status_code == 200, response.text
    return response.json()


def search(api, name: str, **body) -> list[tuple[str, float]]:
    response = api.post(f"/v1/collections/{name}/search", json=body)
    assert response.status_code == 200, response.text
    return [(hit["id"], hit["score"]) for hit in response.json()["results"]]


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    return response.json()["error"]["message"]


def assert_same_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)


def random_items(seed: int, count: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"item-{i:03d}" for i in range(count)], rng.normal(size=(count, DIM))


def test_collection_lifecycle_records_the_served_model_and_dimension(api):
    created = create(api, "lifecycle")
    assert {k: created[k] for k in ("name", "model", "dim", "metric", "index", "count")} == {
        "name": "lifecycle", "model": "tiny", "dim": DIM, "metric": "cosine", "index": "exact", "count": 0}
    assert api.get("/v1/collections/lifecycle").json() == created
    assert "lifecycle" in [c["name"] for c in api.get("/v1/collections").json()["data"]]

    error(api.put("/v1/collections/lifecycle"), 409, "collection_exists")
    assert api.delete("/v1/collections/lifecycle").json() == {"name": "lifecycle", "deleted": True}
    error(api.get("/v1/collections/lifecycle"), 404, "collection_not_found")
    error(api.delete("/v1/collections/lifecycle"), 404, "collection_not_found")
    assert "lifecycle" not in [c["name"] for c in api.get("/v1/collections").json()["data"]]


def test_hnsw_collection_records_its_graph_settings(api):
    created = create(api, "graph-settings", index="hnsw", hnsw={"m": 16, "ef_search": 50})
    assert created["index"] == "hnsw" and created["hnsw"] == {"m": 16, "ef_construction": 200, "ef_search": 50}
    error(api.put("/v1/collections/flat-with-graph", json={"index": "exact", "hnsw": {"m": 16}}),
          422, "validation_error")
    error(api.put("/v1/collections/unknown-index", json={"index": "ivf"}), 422, "validation_error")


def test_openapi_documents_the_json_and_multipart_bodies(api):
    paths = api.get("/openapi.json").json()["paths"]
    for path, method, kinds in [("/v1/collections/{name}", "put", {"application/json"}),
                                ("/v1/collections/{name}/items", "post", {"application/json", "multipart/form-data"}),
                                ("/v1/collections/{name}/search", "post", {"application/json", "multipart/form-data"}),
                                ("/v1/classify", "post", {"application/json", "multipart/form-data"})]:
        content = paths[path][method]["requestBody"]["content"]
        assert set(content) == kinds
        assert "$ref" not in str(content["application/json"]["schema"])
    search = paths["/v1/collections/{name}/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"image", "vector", "id", "k", "filter"} <= set(search["properties"])


@pytest.mark.parametrize("name", ["Upper", "_leading", "-leading", "a" * 65, "dot.ted", "spa ce", "ünï"])
def test_invalid_collection_names_are_refused_with_422(api, name):
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name) is None
    error(api.put(f"/v1/collections/{name}"), 422, "invalid_collection_name")
    error(api.get(f"/v1/collections/{name}"), 422, "invalid_collection_name")
    error(api.post(f"/v1/collections/{name}/search", json={"vector": [1.0] * DIM}), 422, "invalid_collection_name")


def test_items_are_upserted_on_id_read_back_and_deleted(api):
    create(api, "crud")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, DIM))
    added = add(api, "crud", [
        {"id": "a", "vector": vectors[0].tolist(), "label": "cat", "metadata": {"n": 1, "tags": ["x"]}},
        {"id": "photos/b.jpg", "vector": vectors[1].tolist()},
        {"vector": vectors[2].tolist(), "label": "dog"},
    ])
    assert added["ids"][:2] == ["a", "photos/b.jpg"] and re.fullmatch(r"[0-9a-f]{32}", added["ids"][2])
    assert (added["added"], added["updated"], added["unchanged"]) == (3, 0, 0)

    item = api.get("/v1/collections/crud/items/a").json()
    assert (item["id"], item["label"], item["metadata"]) == ("a", "cat", {"n": 1, "tags": ["x"]})
    np.testing.assert_allclose(item["vector"], unit(vectors[0]), atol=1e-6)  # stored L2-normalised
    slashed = api.get("/v1/collections/crud/items/photos/b.jpg", params={"vector": "false"}).json()
    assert slashed == {"id": "photos/b.jpg", "label": None, "metadata": {}, "vector": None}

    same = add(api, "crud", [{"id": "a", "vector": vectors[0].tolist(), "label": "cat",
                              "metadata": {"tags": ["x"], "n": 1}}])
    assert (same["added"], same["updated"], same["unchanged"]) == (0, 0, 1)
    changed = add(api, "crud", [{"id": "a", "vector": vectors[1].tolist(), "label": "lion"}])
    assert (changed["added"], changed["updated"], changed["unchanged"]) == (0, 1, 0)
    item = api.get("/v1/collections/crud/items/a").json()
    assert (item["label"], item["metadata"]) == ("lion", {})
    np.testing.assert_allclose(item["vector"], unit(vectors[1]), atol=1e-6)
    assert api.get("/v1/collections/crud").json()["count"] == 3

    assert api.delete("/v1/collections/crud/items/photos/b.jpg").json() == {"id": "photos/b.jpg", "deleted": True}
    error(api.get("/v1/collections/crud/items/photos/b.jpg"), 404, "item_not_found")
    error(api.delete("/v1/collections/crud/items/photos/b.jpg"), 404, "item_not_found")
    assert api.get("/v1/collections/crud").json()["count"] == 2


def test_items_are_listed_page_by_page(api):
    create(api, "pages")
    ids, vectors = random_items(1, 25)
    add(api, "pages", [{"id": i, "vector": v.tolist(), "label": "l"} for i, v in zip(ids, vectors)])
    seen, cursor = [], None
    while True:
        page = api.get("/v1/collections/pages/items", params={"limit": 10, **({"cursor": cursor} if cursor else {})})
        body = page.json()
        assert len(body["data"]) <= 10 and all(set(item) == {"id", "label", "metadata"} for item in body["data"])
        seen += [item["id"] for item in body["data"]]
        if not (cursor := body["next"]):
            break
    assert sorted(seen) == ids


@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_search_by_vector_ranks_by_cosine_similarity(api, index):
    name = f"rank-{index}"
    create(api, name, index=index)
    ids, vectors = random_items(2, 300)
    add(api, name, [{"id": i, "vector": v.tolist(), "label": f"l{n % 3}", "metadata": {"n": n}}
                    for n, (i, v) in enumerate(zip(ids, vectors))])
    queries = np.random.default_rng(3).normal(size=(4, DIM))

    for query in queries:
        assert_same_ranking(search(api, name, vector=query.tolist(), k=10), top_k(query, ids, vectors, 10))
    hit = api.post(f"/v1/collections/{name}/search", json={"vector": queries[0].tolist(), "k": 1}).json()
    assert hit["results"][0]["metadata"] == {"n": ids.index(hit["results"][0]["id"])}
    assert hit["results"][0]["label"] == f"l{ids.index(hit['results'][0]['id']) % 3}"
    everything = search(api, name, vector=queries[0].tolist(), k=1000)
    assert_same_ranking(everything, top_k(queries[0], ids, vectors, 300))

    batch = api.post(f"/v1/collections/{name}/search", json={"vectors": queries.tolist(), "k": 5}).json()
    assert [r["index"] for r in batch["data"]] == [0, 1, 2, 3]
    for result, query in zip(batch["data"], queries):
        assert_same_ranking([(h["id"], h["score"]) for h in result["results"]], top_k(query, ids, vectors, 5))


@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_filters_on_label_and_metadata_keys_match_brute_force_on_the_subset(api, index):
    name = f"filters-{index}"
    create(api, name, index=index)
    ids, vectors = random_items(4, 240)
    labels = [["cat", "dog", None][n % 3] for n in range(240)]
    metadata = [{"colour": ["red", "blue"][n % 2], "n": n % 5, "flag": n % 7 == 0,
                 **({"tags": ["a", "b"]} if n % 11 == 0 else {})} for n in range(240)]
    add(api, name, [{"id": i, "vector": v.tolist(), "metadata": m, **({"label": lab} if lab else {})}
                    for i, v, lab, m in zip(ids, vectors, labels, metadata)])
    query = np.random.default_rng(5).normal(size=DIM)

    cases = [
        ({"label": "cat"}, lambda n: labels[n] == "cat"),
        ({"metadata": {"colour": "red"}}, lambda n: metadata[n]["colour"] == "red"),
        ({"metadata": {"n": 2, "flag": False}}, lambda n: metadata[n]["n"] == 2 and not metadata[n]["flag"]),
        ({"metadata": {"flag": True}}, lambda n: metadata[n]["flag"]),
        ({"label": "dog", "metadata": {"colour": "blue"}}, lambda n: labels[n] == "dog" and n % 2 == 1),
        ({"metadata": {"tags": "b"}}, lambda n: "tags" in metadata[n]),  # a list matches when it holds the value
        ({"metadata": {"absent": 1}}, lambda n: False),
        ({"metadata": {"n": "2"}}, lambda n: False),  # a string is not the number
    ]
    for where, keep in cases:
        subset = [n for n in range(240) if keep(n)]
        expected = top_k(query, [ids[n] for n in subset], vectors[subset], 8) if subset else []
        assert_same_ranking(search(api, name, vector=query.tolist(), k=8, filter=where), expected)

    error(api.post(f"/v1/collections/{name}/search",
                   json={"vector": query.tolist(), "filter": {"metadata": {"n": 1.5}}}), 422, "validation_error")
    error(api.post(f"/v1/collections/{name}/search", json={"vector": query.tolist(), "filter": {"colour": "red"}}),
          422, "validation_error")


def test_search_by_stored_id_returns_its_neighbours_without_itself(api):
    create(api, "by-id")
    ids, vectors = random_items(6, 60)
    add(api, "by-id", [{"id": i, "vector": v.tolist()} for i, v in zip(ids, vectors)])

    got = search(api, "by-id", id="item-007", k=5)
    assert_same_ranking(got, top_k(vectors[7], ids, vectors, 6)[1:])
    batch = api.post("/v1/collections/by-id/search", json={"ids": ["item-001", "item-002"], "k": 3}).json()
    for result, n in zip(batch["data"], (1, 2)):
        assert_same_ranking([(h["id"], h["score"]) for h in result["results"]], top_k(vectors[n], ids, vectors, 4)[1:])
    error(api.post("/v1/collections/by-id/search", json={"id": "nope"}), 404, "item_not_found")


def store_calls(api) -> float:
    """How many vector-store calls the gateway has made: each is one thread-pool hop timed as stage ``store``."""
    (line,) = [line for line in api.get("/metrics").text.splitlines()
               if line.startswith('dinoserve_stage_duration_seconds_count{stage="store"}')]
    return float(line.split()[-1])


def test_a_batch_of_ids_is_read_from_the_store_in_one_call(api):
    create(api, "by-ids")
    ids, vectors = random_items(7, 200)
    add(api, "by-ids", [{"id": i, "vector": v.tolist()} for i, v in zip(ids, vectors)])
    before = store_calls(api)
    batch = api.post("/v1/collections/by-ids/search", json={"ids": ids, "k": 2})
    assert batch.status_code == 200 and len(batch.json()["data"]) == 200
    assert store_calls(api) - before == 3  # describe, the 200 items, search: not one call per id
    assert_same_ranking([(h["id"], h["score"]) for h in batch.json()["data"][150]["results"]],
                        top_k(vectors[150], ids, vectors, 3)[1:])


@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_deleted_and_replaced_items_leave_the_results(api, index):
    name = f"churn-{index}"
    create(api, name, index=index)
    ids, vectors = random_items(7, 80)
    add(api, name, [{"id": i, "vector": v.tolist()} for i, v in zip(ids, vectors)])
    query = vectors[3] + 0.1 * np.random.default_rng(8).normal(size=DIM)
    for i, _ in top_k(query, ids, vectors, 5):  # the five best go away
        assert api.delete(f"/v1/collections/{name}/items/{i}").status_code == 200
    replaced = np.random.default_rng(9).normal(size=(5, DIM))
    add(api, name, [{"id": ids[n], "vector": v.tolist()} for n, v in zip(range(50, 55), replaced)])

    remaining = {i: v for i, v in zip(ids, vectors)}
    for i, _ in top_k(query, ids, vectors, 5):
        del remaining[i]
    remaining.update({ids[n]: v for n, v in zip(range(50, 55), replaced)})
    expected = top_k(query, list(remaining), np.stack(list(remaining.values())), 10)
    assert_same_ranking(search(api, name, vector=query.tolist(), k=10), expected)
    assert api.get(f"/v1/collections/{name}").json()["count"] == 75


def test_images_are_embedded_by_the_served_model_and_searchable_by_image(api):
    create(api, "pictures")
    images = [jpeg(seed) for seed in range(4)]
    add(api, "pictures", [{"id": "p0", "image": b64(images[0]), "label": "a"},
                          {"id": "p1", "image": b64(images[1]), "label": "b"}])
    multipart = api.post("/v1/collections/pictures/items",
                         files=[("images", ("2.jpg", images[2])), ("images", ("3.jpg", images[3]))],
                         data={"id": ["p2", "p3"], "label": "c", "metadata": '{"source": "upload"}'})
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["ids"] == ["p2", "p3"]

    embedded = api.post("/v1/embeddings", json={"images": [b64(i) for i in images], "normalize": True}).json()
    for n, expected in enumerate(embedded["data"]):
        item = api.get(f"/v1/collections/pictures/items/p{n}").json()
        np.testing.assert_allclose(item["vector"], expected["embedding"], atol=1e-5)
    assert api.get("/v1/collections/pictures/items/p3").json()["metadata"] == {"source": "upload"}

    by_file = api.post("/v1/collections/pictures/search", files=[("image", ("q.jpg", images[2]))], data={"k": "2"})
    assert by_file.status_code == 200, by_file.text
    best = by_file.json()["results"][0]
    assert (best["id"], best["label"]) == ("p2", "c") and best["score"] == pytest.approx(1.0, abs=1e-5)
    batch = api.post("/v1/collections/pictures/search", json={"images": [b64(images[1]), b64(images[0])], "k": 1})
    assert [r["results"][0]["id"] for r in batch.json()["data"]] == ["p1", "p0"]


def test_bad_requests_get_their_status_never_500(api):
    create(api, "errors")
    add(api, "errors", [{"id": "a", "vector": [1.0] * DIM}])
    post = lambda path, body: api.post(f"/v1/collections/errors{path}", json=body)  # noqa: E731

    assert "dimension 3" in error(post("/items", {"items": [{"vector": [1, 2, 3]}]}), 422, "wrong_dimension")
    error(post("/search", {"vector": [1, 2, 3]}), 422, "wrong_dimension")
    error(post("/search", {"vectors": [[1.0] * DIM, [1.0] * 5]}), 422, "wrong_dimension")
    error(post("/items", {"items": [{"vector": [0.0] * DIM}]}), 422, "invalid_vector")
    error(api.post("/v1/collections/errors/items", content=b'{"items": [{"vector": [NaN' + b", 1" * (DIM - 1) + b"]}]}",
                   headers={"content-type": "application/json"}), 422, "validation_error")
    error(post("/items", {"items": [{"vector": [1.0] * DIM, "image": b64(b"x")}]}), 422, "validation_error")
    error(post("/items", {"items": []}), 422, "validation_error")
    error(post("/items", {"items": [{"id": "d", "vector": [1.0] * DIM}, {"id": "d", "vector": [2.0] * DIM}]}),
          422, "validation_error")
    error(post("/items", {"items": [{"vector": [1.0] * DIM, "metadata": [1]}]}), 422, "validation_error")
    error(post("/search", {"vector": [1.0] * DIM, "k": 0}), 422, "validation_error")
    error(post("/search", {"vector": [1.0] * DIM, "k": 1001}), 422, "validation_error")
    error(post("/search", {"vector": [1.0] * DIM, "id": "a"}), 422, "validation_error")
    error(post("/search", {"image": {"data": "not base64!"}}), 400, "invalid_base64")
    error(post("/items", {"items": [{"image": b64(b"not an image")}]}), 415, "unsupported_media_type")
    error(api.post("/v1/collections/errors/items", files=[("images", ("a.jpg", jpeg(0)))], data={"id": ["x", "y"]}),
          422, "validation_error")
    error(api.post("/v1/collections/errors/items", files=[("images", ("a.jpg", jpeg(0)))], data={"colour": "red"}),
          422, "validation_error")  # unknown fields are refused in multipart as in JSON
    error(api.post("/v1/collections/errors/search", content=b"{", headers={"content-type": "application/json"}),
          422, "validation_error")
    error(api.post("/v1/collections/errors/search", content=b"k=1", headers={"content-type": "text/plain"}),
          415, "unsupported_media_type")
    for path in ("/items", "/search"):
        error(api.post(f"/v1/collections/missing{path}", json={"vector": [1.0] * DIM}), 404, "collection_not_found")
    error(api.get("/v1/collections/missing/items/a"), 404, "collection_not_found")
    error(api.delete("/v1/collections/missing/items/a"), 404, "collection_not_found")
    assert api.get("/v1/collections/errors").json()["count"] == 1  # nothing above was written


def test_collection_of_another_model_refuses_images_with_an_explanation(api):
    assert api.get("/v1/collections/foreign").json()["model"] == "other-model"
    message = error(api.post("/v1/collections/foreign/items", json={"items": [{"image": b64(jpeg(1))}]}),
                    409, "model_mismatch")
    assert "other-model" in message and "tiny" in message and "not comparable" in message
    error(api.post("/v1/collections/foreign/search", json={"image": b64(jpeg(1))}), 409, "model_mismatch")
    error(api.post("/v1/classify", json={"collection": "foreign", "images": [b64(jpeg(1))]}), 409, "model_mismatch")
    # Raw vectors of its dimension are still the caller's business.
    add(api, "foreign", [{"id": "y", "vector": [1.0] * DIM, "label": "thing"}])
    assert [i for i, _ in search(api, "foreign", vector=[1.0] * DIM, k=2)] in (["x", "y"], ["y", "x"])
