"""`dinoserve index add COLLECTION PATH...` against the session server: labels from sub-folders, ids from
relative paths, vectors equal to the served embeddings, unreadable files reported, and re-runs that send
only what is missing or changed."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from collections_helpers import b64, jpeg
from conftest import BIN, run_cli
from service.index_cli import Source, find_images


@pytest.fixture
def tree(tmp_path) -> Path:
    """cat/{0,1}.jpg, dog/2.jpg, dog/deeper/3.png, loose.jpg, plus files the command must skip or report."""
    root = tmp_path / "photos"
    for relative, seed in (("cat/0.jpg", 0), ("cat/1.jpg", 1), ("dog/2.jpg", 2), ("dog/deeper/3.png", 3),
                           ("loose.jpg", 4), (".hidden/5.jpg", 5), ("cat/.6.jpg", 6)):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(jpeg(seed))
    (root / "cat" / "broken.jpg").write_bytes(b"not an image")
    (root / "dog" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_find_images_takes_labels_from_first_level_folders_and_ids_from_relative_paths(tree):
    found = find_images([tree])
    assert found == [
        Source(tree / "cat/0.jpg", "cat/0.jpg", "cat"), Source(tree / "cat/1.jpg", "cat/1.jpg", "cat"),
        Source(tree / "cat/broken.jpg", "cat/broken.jpg", "cat"),
        Source(tree / "dog/2.jpg", "dog/2.jpg", "dog"), Source(tree / "dog/deeper/3.png", "dog/deeper/3.png", "dog"),
        Source(tree / "dog/gone.jpg", "dog/gone.jpg", "dog"), Source(tree / "loose.jpg", "loose.jpg", None),
    ]
    assert find_images([tree / "cat" / "0.jpg"]) == [Source(tree / "cat" / "0.jpg", "0.jpg", None)]
    with pytest.raises(ValueError, match="'cat/0.jpg'"):
        find_images([tree, tree])
    with pytest.raises(FileNotFoundError):
        find_images([tree / "nothing"])


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def test_index_add_embeds_a_folder_tree_and_resumes_without_duplicates(server, api, tree):
    name = f"pets-{uuid.uuid4().hex[:8]}"
    args = ("index", "add", name, str(tree), "--url", server.url, "--batch-size", "2", "--concurrency", "2")
    first = run_cli(*args)
    assert "7 images found, 0 already indexed" in first.stdout and "5 added, 0 updated" in first.stdout
    assert "skipped 2 unreadable files" in first.stdout
    assert f"{tree / 'cat/broken.jpg'}: 415 not a recognised image format" in first.stdout
    assert f"{tree / 'dog/gone.jpg'}: No such file or directory" in first.stdout
    assert re.search(r"7/7 \[[0-9:]+<[0-9:]+, +[0-9.]+(img/s|s/img)\]", first.stderr)  # the progress bar

    stored = {item["id"]: item for item in api.get(f"/v1/collections/{name}/items").json()["data"]}
    assert {i: item["label"] for i, item in stored.items()} == {
        "cat/0.jpg": "cat", "cat/1.jpg": "cat", "dog/2.jpg": "dog", "dog/deeper/3.png": "dog", "loose.jpg": None}
    collection = api.get(f"/v1/collections/{name}").json()
    assert (collection["model"], collection["count"]) == ("tiny", 5)
    embedded = api.post("/v1/embeddings", json={
        "images": [b64((tree / i).read_bytes()) for i in sorted(stored)], "normalize": True}).json()
    for item_id, expected in zip(sorted(stored), embedded["data"]):
        vector = api.get(f"/v1/collections/{name}/items/{item_id}").json()["vector"]
        np.testing.assert_allclose(vector, expected["embedding"], atol=1e-5)

    again = run_cli(*args, "--quiet")
    assert "7 images found, 5 already indexed; sent 0" in again.stdout
    assert api.get(f"/v1/collections/{name}").json()["count"] == 5

    # Resume after an interruption (an item missing) and a changed file: only those two are sent.
    assert api.delete(f"/v1/collections/{name}/items/cat/1.jpg").status_code == 200
    (tree / "dog/2.jpg").write_bytes(jpeg(9))
    os.utime(tree / "dog/2.jpg", ns=(1, 1))
    resumed = run_cli(*args, "--quiet")
    assert "3 already indexed; sent 2" in resumed.stdout
    assert "1 added, 1 updated" in resumed.stdout
    changed = api.get(f"/v1/collections/{name}/items/dog/2.jpg").json()
    assert changed["metadata"]["mtime_ns"] == 1
    new = api.post("/v1/embeddings", json={"images": [b64(jpeg(9))], "normalize": True}).json()
    np.testing.assert_allclose(changed["vector"], new["data"][0]["embedding"], atol=1e-5)


def test_index_add_stops_with_the_gateways_reason_and_a_failing_status(server, tree):
    result = subprocess.run([str(BIN / "dinoserve"), "index", "add", "Not_Valid", str(tree), "--url", server.url,
                             "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "collection Not_Valid: 422 collection name 'Not_Valid' must match" in result.stderr
