"""``POST /v1/classify`` is DINO's weighted k-NN vote: checked against the official ``eval_knn.py``
formula (transcribed below in PyTorch) on labelled clusters built here, against hand-computed votes,
and against ``dinoserve eval-knn``'s ``knn_classifier``, which shares its implementation."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import torch

from collections_helpers import BACKENDS, b64, fast_data_dir, jpeg, start_gateway, unit
from core.knn import class_votes, label_shares, rank_classes
from training.evaluate import knn_classifier

DIM = 96
CLASSES = [f"class-{c:02d}" for c in range(12)]  # sorted names = class indices, as ImageFolder orders folders


@pytest.fixture(scope="module", params=BACKENDS)
def api(request, server, bundle, tmp_path_factory):
    for data_dir in fast_data_dir(tmp_path_factory, request.param):
        log = tmp_path_factory.mktemp(f"classify-{request.param}") / "serve.log"
        gateway = start_gateway(server, bundle, log, data_dir, request.param)
        with httpx.Client(base_url=gateway.url, timeout=120) as client:
            yield client
        gateway.stop()


def official_knn(train_features, train_labels, test_features, k, T, num_classes):
    """The vote of the official ``eval_knn.py`` ``knn_classifier`` for one batch of test features:
    cosine similarities, top-k, one-hot labels weighted by exp(similarity / T), summed per class."""
    batch_size = test_features.shape[0]
    similarity = torch.mm(test_features, train_features.t())
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    candidates = train_labels.view(1, -1).expand(batch_size, -1)
    retrieved_neighbors = torch.gather(candidates, 1, indices)
    retrieval_one_hot = torch.zeros(batch_size * k, num_classes)
    retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
    distances_transform = distances.clone().div_(T).exp_()
    probs = torch.sum(
        torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes), distances_transform.view(batch_size, -1, 1)), 1)
    _, predictions = probs.sort(1, True)
    return probs, predictions, distances, indices


def clusters(seed: int, per_class: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around one random centre per class, overlapping enough that k-NN makes mistakes."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(len(CLASSES), DIM))
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    return unit(centres[labels] + spread * rng.normal(size=(len(labels), DIM))).astype(np.float32), labels


def classify(api, **body) -> dict:
    response = api.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_class_votes_equal_the_official_formula_on_random_neighbours():
    rng = np.random.default_rng(0)
    train = unit(rng.normal(size=(120, 16))).astype(np.float32)
    test = unit(rng.normal(size=(30, 16))).astype(np.float32)
    train_labels = rng.integers(0, 6, size=120)
    probs, predictions, distances, indices = official_knn(torch.from_numpy(train), torch.from_numpy(train_labels),
                                                          torch.from_numpy(test), 20, 0.07, 6)
    votes = class_votes(distances.numpy(), train_labels[indices.numpy()], 6, 0.07)
    # Ours scale each row so that its nearest neighbour weighs 1: the same votes up to that factor.
    scale = np.exp(distances[:, :1].double().numpy() / 0.07)
    np.testing.assert_allclose(votes * scale, probs.double().numpy(), rtol=1e-5)
    voted = probs > 0
    assert all((rank_classes(votes)[i][:int(voted[i].sum())] == predictions[i][:int(voted[i].sum())].numpy()).all()
               for i in range(30))


def test_label_shares_stay_finite_at_temperatures_where_exp_overflows():
    # exp(1 / 0.001) overflows float64; the shares are still well defined.
    shares = dict(label_shares(np.array([1.0, 0.999, 0.5]), ["a", "b", "b"], temperature=0.001))
    assert shares["a"] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-9)
    assert shares["b"] == pytest.approx(1 - shares["a"], rel=1e-9)


def test_classify_matches_the_official_eval_knn_formula_and_eval_knn(api):
    train, train_labels = clusters(seed=1, per_class=20, spread=3.5)
    test, test_labels = clusters(seed=2, per_class=5, spread=3.5)
    assert api.put("/v1/collections/knn-train").status_code == 201
    items = [{"id": f"t{i}", "vector": v.tolist(), "label": CLASSES[y]}
             for i, (v, y) in enumerate(zip(train, train_labels))]
    items.append({"id": "unlabelled", "vector": test[0].tolist()})  # must not vote
    assert api.post("/v1/collections/knn-train/items", json={"items": items}).status_code == 200

    body = classify(api, collection="knn-train", vectors=test.tolist(), top=len(CLASSES))
    assert (body["k"], body["temperature"]) == (20, 0.07)  # DINO's defaults
    probs, predictions, distances, indices = official_knn(torch.from_numpy(train), torch.from_numpy(train_labels),
                                                          torch.from_numpy(test), 20, 0.07, len(CLASSES))
    for i, result in enumerate(body["data"]):
        assert result["index"] == i
        assert [n["id"] for n in result["neighbors"]] == [f"t{j}" for j in indices[i].tolist()]
        np.testing.assert_allclose([n["score"] for n in result["neighbors"]], distances[i].numpy(), atol=1e-5)
        voted = int((probs[i] > 0).sum())
        assert [s["label"] for s in result["scores"]] == [CLASSES[c] for c in predictions[i][:voted].tolist()]
        np.testing.assert_allclose([s["score"] for s in result["scores"]],
                                   (probs[i] / probs[i].sum())[predictions[i][:voted]].numpy(), rtol=1e-4)
        assert result["label"] == CLASSES[predictions[i][0]]

    # Top-1 / top-5 as the official code counts them, and as `dinoserve eval-knn` computes them.
    correct = predictions.eq(torch.from_numpy(test_labels).view(-1, 1))
    official = (correct.narrow(1, 0, 1).sum().item() * 100.0 / len(test),
                correct.narrow(1, 0, 5).sum().item() * 100.0 / len(test))
    served = (100.0 * np.mean([r["label"] == CLASSES[y] for r, y in zip(body["data"], test_labels)]),
              100.0 * np.mean([CLASSES[y] in [s["label"] for s in r["scores"][:5]]
                               for r, y in zip(body["data"], test_labels)]))
    assert 40 < official[0] < official[1] < 100  # a test set on which k-NN is neither hopeless nor perfect
    assert served == pytest.approx(official)
    assert knn_classifier(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test),
                          torch.from_numpy(test_labels), 20, 0.07, len(CLASSES)) == pytest.approx(official)


def test_vote_shares_follow_exp_of_similarity_over_temperature(api):
    # Neighbours of [1, 0, ...] at cosine 1 ("near"), 0.8 and 0.6 (both "far"); a fourth item is orthogonal.
    angle = lambda c: [c, math.sqrt(1 - c * c)] + [0.0] * (DIM - 2)  # noqa: E731
    assert api.put("/v1/collections/votes").status_code == 201
    items = [{"id": "n", "vector": angle(1.0), "label": "near"}, {"id": "f1", "vector": angle(0.8), "label": "far"},
             {"id": "f2", "vector": angle(0.6), "label": "far"}, {"id": "o", "vector": angle(0.0), "label": "other"}]
    assert api.post("/v1/collections/votes/items", json={"items": items}).status_code == 200
    query = angle(1.0)

    warm = classify(api, collection="votes", vectors=[query], k=3, temperature=1.0)["data"][0]
    near, far = math.exp(1.0), math.exp(0.8) + math.exp(0.6)  # 2.72 < 4.04: two fair neighbours win
    assert warm["label"] == "far"
    assert [(s["label"], pytest.approx(s["score"], rel=1e-5)) for s in warm["scores"]] == [
        ("far", far / (near + far)), ("near", near / (near + far))]
    cold = classify(api, collection="votes", vectors=[query], k=3, temperature=0.1, top=1)["data"][0]
    assert cold["label"] == "near" and len(cold["scores"]) == 1  # e^10 > e^8 + e^6
    assert cold["scores"][0]["score"] == pytest.approx(math.exp(10) / (math.exp(10) + math.exp(8) + math.exp(6)),
                                                       rel=1e-5)
    restricted = classify(api, collection="votes", vectors=[query], k=3, filter={"label": "other"})
    assert restricted["k"] == 1 and restricted["data"][0]["label"] == "other"


def test_classify_images_votes_with_their_served_embeddings(api):
    images = [jpeg(seed) for seed in range(6)]
    assert api.put("/v1/collections/knn-images").status_code == 201
    labels = ["even", "odd", "even", "odd"]
    added = api.post("/v1/collections/knn-images/items", files=[("images", (f"{i}.jpg", images[i])) for i in range(4)],
                     data={"id": [f"img{i}" for i in range(4)], "label": labels})  # one label per image
    assert added.status_code == 200, added.text

    embedded = api.post("/v1/embeddings", json={"images": [b64(i) for i in images], "normalize": True}).json()
    vectors = np.array([d["embedding"] for d in embedded["data"]])
    by_file = api.post("/v1/classify", files=[("images", ("4.jpg", images[4])), ("images", ("5.jpg", images[5]))],
                       data={"collection": "knn-images", "k": "3"})
    assert by_file.status_code == 200, by_file.text
    for result, query in zip(by_file.json()["data"], vectors[4:]):
        sims = vectors[:4] @ query
        nearest = np.argsort(-sims)[:3]
        expected = label_shares(sims[nearest], [labels[j] for j in nearest], 0.07)
        assert [n["id"] for n in result["neighbors"]] == [f"img{j}" for j in nearest]
        assert [(s["label"], pytest.approx(s["score"], abs=1e-4)) for s in result["scores"]] == expected


def test_classify_errors_are_4xx(api):
    assert api.put("/v1/collections/no-labels").status_code == 201
    assert api.post("/v1/collections/no-labels/items", json={"items": [{"vector": [1.0] * DIM}]}).status_code == 200
    vector = [[1.0] * DIM]
    for body, status, code in [
        ({"collection": "no-labels", "vectors": vector}, 422, "no_labelled_items"),
        ({"collection": "missing", "vectors": vector}, 404, "collection_not_found"),
        ({"collection": "Bad Name", "vectors": vector}, 422, "invalid_collection_name"),
        ({"collection": "no-labels", "vectors": [[1.0] * 3]}, 422, "wrong_dimension"),
        ({"collection": "no-labels", "vectors": vector, "temperature": 0}, 422, "validation_error"),
        ({"collection": "no-labels", "vectors": vector, "k": 0}, 422, "validation_error"),
        ({"collection": "no-labels", "vectors": vector, "images": [b64(jpeg(0))]}, 422, "validation_error"),
        ({"collection": "no-labels"}, 422, "validation_error"),
    ]:
        response = api.post("/v1/classify", json=body)
        assert response.status_code == status and response.json()["error"]["code"] == code, (body, response.text)
