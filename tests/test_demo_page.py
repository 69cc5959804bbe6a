"""The demo page at ``/`` and its demo collection: served assets, the synthetic samples, the fill on first
start (and never over an existing collection), and the page itself driven in headless Chromium (Debian's
``chromium``, which ``make test`` installs) through Playwright against a real gateway and Triton."""

from __future__ import annotations

import base64
import io
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from serving import Server
from service.collections import IndexConfig, Item, open_store
from service.demo_samples import COLLECTION_SAMPLES, SIZE, picker_samples
from core.model_card import ModelCard
from training.data import CLASSES, make_sample

CHROMIUM = Path("/usr/bin/chromium")
COLLECTION = "demo"
NEIGHBOURS = 8  # what the page asks for
WAIT_MS = 120_000  # the machine may be busy: generous, the tests do not wait for nothing


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


def collection_count(url: str, name: str) -> int | None:
    response = httpx.get(f"{url}/v1/collections/{name}", timeout=30)
    return response.json()["count"] if response.status_code == 200 else None


def demo_gateway(server: Server, bundle: Path, folder: Path) -> Server:
    """`dinoserve serve` with the demo collection on, data in ``folder``, using the session server's Triton."""
    return Server(bundle, folder / "serve.log", ["--triton-url", server.triton_url, "--data-dir", str(folder / "data"),
                                                 "--demo-collection", COLLECTION])


@pytest.fixture(scope="module")
def gateway(server, bundle, tmp_path_factory):
    """A demo gateway whose demo collection is filled."""
    gw = demo_gateway(server, bundle, tmp_path_factory.mktemp("demo-page"))
    try:
        gw.wait_ready()
        wait_for(lambda: collection_count(gw.url, COLLECTION) == COLLECTION_SAMPLES, "the demo collection")
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


class PageRun:
    """A fresh page of ``url`` that records every URL the browser requested, every script error and every
    breach of the page's Content-Security-Policy."""

    def __init__(self, browser: Browser, url: str):
        self.url = url
        self.page: Page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.set_default_timeout(WAIT_MS)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: "Content Security Policy" in message.text
                     and self.errors.append(message.text))
        self.page.goto(f"{url}/")
        self.page.wait_for_selector(".sample img")

    def wait_until_settled(self) -> None:
        """Every card has its answer (or its error). (Not wait_for_function: the page's CSP forbids eval.)"""
        expect(self.page.locator("#results")).to_be_visible(timeout=WAIT_MS)
        expect(self.page.locator(".card.loading")).to_have_count(0, timeout=WAIT_MS)

    def texts(self, selector: str) -> list[str]:
        return [t.strip() for t in self.page.locator(selector).all_inner_texts()]

    def attribute(self, selector: str, name: str) -> list[str]:
        return [el.get_attribute(name) for el in self.page.locator(selector).all()]

    def assert_stayed_on_the_gateway(self) -> None:
        outside = [u for u in self.requests if not u.startswith((f"{self.url}/", "data:", "blob:"))]
        assert not outside, f"the page requested other hosts: {outside}"
        assert not self.errors, f"script errors or CSP breaches: {self.errors}"


@pytest.fixture
def page(browser, gateway):
    run = PageRun(browser, gateway.url)
    yield run
    run.page.close()


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def api_answers(url: str, data: bytes) -> tuple[list[str], dict]:
    """What the API says about ``data``: the ids of the nearest neighbours and the k-NN answer."""
    search = httpx.post(f"{url}/v1/collections/{COLLECTION}/search", files={"image": ("q.jpg", data)},
                        data={"k": str(NEIGHBOURS)}, timeout=120)
    classify = httpx.post(f"{url}/v1/classify", files={"images": ("q.jpg", data)}, data={"collection": COLLECTION},
                          timeout=120)
    assert search.status_code == classify.status_code == 200, (search.text, classify.text)
    return [hit["id"] for hit in search.json()["results"]], classify.json()["data"][0]


def assert_page_shows_the_api_answers(run: PageRun, data: bytes, heads: int) -> None:
    """The overlay, mask and per-head heatmaps are rendered PNGs; the label and the neighbours are the API's
    for the same bytes, and every neighbour's thumbnail loaded."""
    run.wait_until_settled()
    assert run.texts(".card .error") == []
    for selector in ("#overlay", "#mask"):
        assert run.attribute(selector, "src")[0].startswith("data:image/png;base64,")
        assert run.page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")
    assert len(run.attribute("#heads img", "src")) == heads
    assert run.texts("#heads figcaption") == [f"head {i}" for i in range(heads)]
    neighbour_ids, classification = api_answers(run.url, data)
    assert run.texts("#label") == [classification["label"]]
    assert re.fullmatch(r"\d{1,3}% of the vote", run.texts("#share")[0])
    assert run.texts("#neighbours .id") == neighbour_ids and len(neighbour_ids) == NEIGHBOURS
    wait_for(lambda: run.page.eval_on_selector_all(
        "#neighbours img", "imgs => imgs.every(img => img.complete && img.naturalWidth > 0)"), "the thumbnails", 60)
    assert len(run.attribute("#neighbours img", "src")) == NEIGHBOURS


# ---------------------------------------------------------------------------------------------- served files

def test_page_and_its_assets_are_served_with_their_content_types(gateway):
    page = httpx.get(f"{gateway.url}/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'<(?:link rel="stylesheet" href|script src)="([^"]+)"', page.text)
    assert sorted(assets) == ["/static/demo.css", "/static/demo.js"]
    expected = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
    for asset in assets:
        response = httpx.get(f"{gateway.url}{asset}")
        assert response.status_code == 200 and response.headers["content-type"] == expected[Path(asset).suffix]
    missing = httpx.get(f"{gateway.url}/static/../settings.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_page_references_no_other_host(gateway):
    texts = [httpx.get(f"{gateway.url}{path}").text for path in ("/", "/static/demo.css", "/static/demo.js")]
    for text in texts:
        assert not re.findall(r"https?://", text)
        # Protocol-relative URLs in attributes and CSS: src="//host/...", url(//host/...)
        assert not re.findall(r"""(?:=\s*["']?|url\(\s*["']?)//""", text)


def test_samples_are_one_per_class_from_the_shapes_generator(gateway):
    body = httpx.get(f"{gateway.url}/demo/samples").json()
    assert body["collection"] == COLLECTION
    assert [s["label"] for s in body["data"]] == list(CLASSES)
    for sample in body["data"]:
        response = httpx.get(f"{gateway.url}{sample['url']}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        assert response.content == jpeg_bytes(make_sample(sample["index"], size=SIZE).image)  # made, not shipped
        assert sample["index"] >= COLLECTION_SAMPLES  # queries, not items of the collection
    unknown = httpx.get(f"{gateway.url}/demo/samples/{COLLECTION_SAMPLES + len(CLASSES)}.jpg")
    assert unknown.status_code == 404 and "no demo sample" in unknown.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- the demo collection

def test_demo_collection_is_filled_on_first_start_with_labelled_thumbnailed_samples(gateway, bundle):
    info = httpx.get(f"{gateway.url}/v1/collections/{COLLECTION}").json()
    assert info["model"] == bundle.name and info["count"] == COLLECTION_SAMPLES
    items = httpx.get(f"{gateway.url}/v1/collections/{COLLECTION}/items", params={"limit": 1000}).json()["data"]
    assert Counter(item["label"] for item in items) == {c: COLLECTION_SAMPLES // len(CLASSES) for c in CLASSES}
    for item in items:
        index = item["metadata"]["sample"]
        assert item["label"] == make_sample(index, size=32).class_name and item["id"].startswith(item["label"])
        assert item["metadata"]["thumbnail"] == f"/demo/samples/{index}.jpg"
    # Each item was embedded from its thumbnail's bytes: that image finds it first, at cosine 1.
    thumbnail = httpx.get(f"{gateway.url}{items[7]['metadata']['thumbnail']}").content
    hits = httpx.post(f"{gateway.url}/v1/collections/{COLLECTION}/search", files={"image": ("t.jpg", thumbnail)},
                      data={"k": "1"}).json()["results"]
    assert hits[0]["id"] == items[7]["id"] and hits[0]["score"] == pytest.approx(1, abs=1e-5)


def test_an_existing_collection_of_the_demo_name_is_left_as_it_is(server, bundle, tmp_path):
    dim = ModelCard.load(bundle).embed_dim
    store = open_store("embedded", tmp_path / "data")
    store.create_collection(COLLECTION, bundle.name, dim, IndexConfig())
    store.upsert(COLLECTION, [Item("users-own", np.ones(dim, np.float32), "mine", {"keep": True})])
    store.close()
    gw = demo_gateway(server, bundle, tmp_path)
    try:
        gw.wait_ready()
        log = tmp_path / "serve.log"
        decision = f"demo collection '{COLLECTION}' exists; left as it is"
        wait_for(lambda: decision in log.read_text(), "the fill's decision")
        items = httpx.get(f"{gw.url}/v1/collections/{COLLECTION}/items").json()["data"]
        assert items == [{"id": "users-own", "label": "mine", "metadata": {"keep": True}}]
    finally:
        gw.stop()


def test_without_a_demo_collection_the_page_still_segments_and_says_why_the_rest_is_off(server, browser):
    # The session server runs with DINOSERVE_DEMO_COLLECTION empty (tests/serving.py).
    assert httpx.get(f"{server.url}/demo/samples").json()["collection"] is None
    assert COLLECTION not in [c["name"] for c in httpx.get(f"{server.url}/v1/collections").json()["data"]]
    run = PageRun(browser, server.url)
    try:
        run.page.click(".sample >> nth=0")
        run.wait_until_settled()
        assert run.attribute("#overlay", "src")[0].startswith("data:image/png;base64,")
        for card in ("#classify-card", "#neighbours-card"):
            assert "DINOSERVE_DEMO_COLLECTION empty" in run.texts(f"{card} .status")[0]
        run.assert_stayed_on_the_gateway()
    finally:
        run.page.close()


# ---------------------------------------------------------------------------------------------- in the browser

def model_heads(url: str) -> int:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["num_heads"]


def test_picking_a_sample_shows_heatmaps_overlay_label_and_neighbours(page, gateway):
    sample = picker_samples()[4]
    page.page.click(f'.sample[data-index="{sample["index"]}"]')
    data = httpx.get(f"{gateway.url}{sample['url']}").content
    assert_page_shows_the_api_answers(page, data, model_heads(gateway.url))
    assert page.texts("#photo-caption") == [f"sample {sample['index']}: a synthetic {sample['label']}, "
                                            "not in the collection"]
    page.assert_stayed_on_the_gateway()


def test_an_uploaded_file_is_analysed(page, gateway, tmp_path):
    photo = tmp_path / "my-photo.jpg"
    photo.write_bytes(jpeg_bytes(make_sample(7, size=(320, 240), seed=5).image))
    page.page.set_input_files("#file", str(photo))
    assert_page_shows_the_api_answers(page, photo.read_bytes(), model_heads(gateway.url))
    assert page.texts("#photo-caption") == ["my-photo.jpg"]
    page.assert_stayed_on_the_gateway()


def test_a_dropped_file_is_analysed(page, gateway):
    data = jpeg_bytes(make_sample(11, size=(240, 240), seed=5).image)
    transfer = page.page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
            return transfer;
        }""", base64.b64encode(data).decode())
    page.page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    assert_page_shows_the_api_answers(page, data, model_heads(gateway.url))
    assert page.texts("#photo-caption") == ["dropped.jpg"]


def test_large_photos_are_scaled_to_1024_pixels_before_upload(page, tmp_path):
    photo = tmp_path / "large.jpg"
    photo.write_bytes(jpeg_bytes(make_sample(3, size=400).image.resize((1600, 1200))))
    with page.page.expect_response("**/v1/segment") as answer:
        page.page.set_input_files("#file", str(photo))
    assert (answer.value.json()["width"], answer.value.json()["height"]) == (1024, 768)
    page.wait_until_settled()


def test_an_unreadable_file_shows_the_apis_error_message_in_every_card(page, gateway, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_bytes(b"this is not an image")
    page.page.set_input_files("#file", str(text))
    page.wait_until_settled()
    expected = httpx.post(f"{gateway.url}/v1/segment", files={"image": ("notes.jpg", text.read_bytes())})
    assert expected.status_code == 415
    message = expected.json()["error"]["message"]
    cards = ("#segment-card", "#heads-card", "#classify-card", "#neighbours-card")
    assert [page.texts(f"{card} .error .message")[0] for card in cards] == [message] * len(cards)
    assert "HTTP 415" in page.texts("#segment-card .error small")[0]
    assert page.page.locator("#overlay").is_hidden()
