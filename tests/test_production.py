"""Production manners of the gateway against real processes (`dinoserve serve` of the committed demo bundle,
its embedded Triton, gateways using that Triton through ``--triton-url``): 429 with ``Retry-After`` past
``max_inflight``, 504 past the inference deadline with the Triton connections still usable, 503 while Triton
is down and recovery without a gateway restart, Prometheus ``/metrics``, request ids and JSON logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from serving import Server
from service.embedded_triton import free_port
from service.errors import ApiError
from service.metrics import GatewayMetrics
from core.model_card import ModelCard
from service.observability import ObservabilityMiddleware
from service.triton_backend import TritonBackend

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "demo" / "model_repository" / "dinoserve-demo"
KEY = "production-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
PYTHON_TEXT_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def jpeg(seed: int, size=(320, 240)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_files(count: int) -> list:
    return [("images", (f"{i}.jpg", jpeg(i), "image/jpeg")) for i in range(count)]


def metric_samples(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the gateway's ``/metrics``, keyed by (name, labels), read without an API key."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def start(bundle: Path, folder: Path, args=(), env=None, triton_port=None) -> Server:
    """A ready `dinoserve serve` whose log and data live in ``folder``."""
    folder.mkdir(parents=True)
    srv = Server(bundle, folder / "serve.log", args, env, triton_port)
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """`dinoserve serve` of the demo bundle: the Triton that the module's gateways use."""
    srv = start(DEMO_BUNDLE, tmp_path_factory.mktemp("production") / "triton")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_gateway(triton, tmp_path_factory):
    """A fresh gateway that needs API keys: its metrics start from zero."""
    srv = start(DEMO_BUNDLE, tmp_path_factory.mktemp("production") / "keyed", ["--triton-url", triton.triton_url],
                env={"DINOSERVE_API_KEYS": KEY})
    yield srv
    srv.stop()


# ---------------------------------------------------------------------------------------------- metrics

def test_metrics_count_and_time_requests_by_route_template_and_status_and_split_the_stages(keyed_gateway):
    url = keyed_gateway.url
    for seed in (1, 2):
        assert httpx.post(f"{url}/v1/embeddings", files=[("images", ("a.jpg", jpeg(seed), "image/jpeg"))],
                          headers=AUTH, timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/embeddings", files=[("images", ("a.txt", b"text", "text/plain"))],
                      headers=AUTH, timeout=60).status_code == 415
    assert httpx.post(f"{url}/v1/embeddings", files=image_files(1), timeout=60).status_code == 401
    assert httpx.get(f"{url}/v1/collections/no-such-collection", headers=AUTH).status_code == 404
    assert httpx.put(f"{url}/v1/collections/metrics-test", headers=AUTH).status_code == 201
    assert httpx.post(f"{url}/v1/collections/metrics-test/items", files=image_files(2), headers=AUTH,
                      timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/segment", files=[("image", ("s.jpg", jpeg(3), "image/jpeg"))],
                      headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200 and httpx.get(f"{url}/v1/models").status_code == 401

    m = metric_samples(url)
    for status, count in (("200", 2), ("415", 1), ("401", 1)):
        labels = dict(method="POST", endpoint="/v1/embeddings", status=status)
        assert sample(m, "dinoserve_requests_total", **labels) == count
        assert sample(m, "dinoserve_request_duration_seconds_count", **labels) == count
        assert sample(m, "dinoserve_request_duration_seconds_bucket", le="+Inf", **labels) == count
        assert sample(m, "dinoserve_request_duration_seconds_sum", **labels) > 0
    # The route template, never the raw path: the label set stays bounded.
    assert sample(m, "dinoserve_requests_total", method="GET", endpoint="/v1/collections/{name}", status="404") == 1
    assert sample(m, "dinoserve_requests_total", method="POST", endpoint="/v1/collections/{name}/items",
                  status="200") == 1
    assert sample(m, "dinoserve_requests_total", method="POST", endpoint="/v1/segment", status="200") == 1
    assert not [labels for _, labels in m if any("no-such-collection" in v for _, v in labels)]
    for stage in ("decode", "preprocess", "inference", "postprocess", "store"):
        assert sample(m, "dinoserve_stage_duration_seconds_count", stage=stage) > 0, stage
        assert sample(m, "dinoserve_stage_duration_seconds_sum", stage=stage) > 0, stage
    # 2 + 1 (refused as text) embeddings requests, 2 items, 1 segmentation: 6 images decoded.
    assert sample(m, "dinoserve_stage_duration_seconds_count", stage="decode") == 6
    assert sample(m, "dinoserve_stage_duration_seconds_count", stage="inference") == 4
    assert sample(m, "dinoserve_inference_inflight") == 0
    assert sample(m, "dinoserve_inference_inflight_limit") == 64
    assert sample(m, "dinoserve_rejected_requests_total") == 0
    assert sample(m, "process_resident_memory_bytes") > 0


# ------------------------------------------------------------------------------------ request ids and logs

def test_request_id_is_echoed_when_given_and_generated_when_absent_or_malformed(keyed_gateway):
    url = keyed_gateway.url
    ok = httpx.post(f"{url}/v1/embeddings", files=image_files(1), headers={**AUTH, "X-Request-ID": "trace-42/a:b"},
                    timeout=60)
    assert ok.status_code == 200 and ok.headers["X-Request-ID"] == "trace-42/a:b"
    for response in (httpx.post(f"{url}/v1/embeddings", files=image_files(1), headers={"X-Request-ID": "e-401"}),
                     httpx.get(f"{url}/v1/nothing", headers={"X-Request-ID": "e-404"}),
                     httpx.post(f"{url}/v1/embeddings", content=b"x", headers={**AUTH, "X-Request-ID": "e-415",
                                                                              "content-type": "text/plain"})):
        assert response.status_code in (401, 404, 415) and "error" in response.json()
        assert response.headers["X-Request-ID"] == f"e-{response.status_code}"
    generated = httpx.get(f"{url}/healthz").headers["X-Request-ID"]
    assert GENERATED_ID.fullmatch(generated)
    assert httpx.get(f"{url}/healthz").headers["X-Request-ID"] != generated
    for malformed in ("has spaces", "x" * 129, "tab\there"):
        echoed = httpx.get(f"{url}/healthz", headers={"X-Request-ID": malformed}).headers["X-Request-ID"]
        assert GENERATED_ID.fullmatch(echoed), malformed


def test_an_unhandled_error_becomes_a_json_500_with_the_request_id_and_is_counted(caplog):
    app = FastAPI()

    @app.get("/boom/{item}")
    async def boom(item: str):
        raise RuntimeError(f"bug on {item}")

    metrics = GatewayMetrics(max_inflight=4)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom/x", headers={"X-Request-ID": "bug-1"})
    assert response.status_code == 500 and response.headers["X-Request-ID"] == "bug-1"
    assert response.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert metrics.registry.get_sample_value(
        "dinoserve_requests_total", {"method": "GET", "endpoint": "/boom/{item}", "status": "500"}) == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info[0] is RuntimeError and "GET /boom/x" in errors[0].getMessage()


def _json_lines_with(log: Path, request_id: str, timeout: float = 10) -> list[dict]:
    """The log's JSON lines stamped with ``request_id`` (the access line is written once the answer is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(line) for line in log.read_text().splitlines()
                 if line.startswith("{") and request_id in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_logs_are_json_lines_and_access_lines_carry_the_request_id(keyed_gateway):
    url = keyed_gateway.url
    assert httpx.post(f"{url}/v1/embeddings", files=image_files(2), headers={**AUTH, "X-Request-ID": "log-ok"},
                      timeout=60).status_code == 200
    assert httpx.get(f"{url}/v1/collections/absent", headers={**AUTH, "X-Request-ID": "log-404"}).status_code == 404
    log = Path(keyed_gateway.log.name)
    for rid, method, path, status in (("log-ok", "POST", "/v1/embeddings", 200),
                                      ("log-404", "GET", "/v1/collections/absent", 404)):
        (line,) = [entry for entry in _json_lines_with(log, rid) if entry["logger"] == "dinoserve.access"]
        assert line["request_id"] == rid and line["level"] == "info"
        assert (line["method"], line["path"], line["status"]) == (method, path, status)
        assert line["duration_ms"] > 0 and f"{method} {path} {status}" in line["message"]
        assert datetime.fromisoformat(line["time"]).tzinfo is not None
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]  # every such line parses
    assert {"uvicorn.error", "service.app", "dinoserve.access"} <= {r["logger"] for r in records}
    assert all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    assert not [line for line in lines if PYTHON_TEXT_LOG.match(line)], "a Python log line in text form"


def test_a_client_gone_mid_body_is_logged_as_499_not_as_a_malformed_body(keyed_gateway):
    host, port = keyed_gateway.url.removeprefix("http://").split(":")
    body = (b"--b\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + jpeg(4))
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"X-Request-ID: gone-mid-body\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body) + 1000}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)  # the gateway is parsing the part when the connection goes
    log = Path(keyed_gateway.log.name)
    (line,) = [e for e in _json_lines_with(log, "gone-mid-body") if e["logger"] == "dinoserve.access"]
    assert line["status"] == 499 and line["level"] == "info"
    assert not [e for e in _json_lines_with(log, "gone-mid-body") if e["level"] in ("warning", "error")]
    assert httpx.post(f"{keyed_gateway.url}/v1/embeddings", files=image_files(1), headers=AUTH,
                      timeout=60).status_code == 200  # and the gateway goes on


# ------------------------------------------------------------------------------------- backpressure and time

def test_requests_past_max_inflight_get_429_with_retry_after_and_the_rest_succeed(triton, tmp_path):
    gateway = start(DEMO_BUNDLE, tmp_path / "gateway", ["--triton-url", triton.triton_url, "--max-inflight", "1"])
    files = image_files(16)

    def post(_):
        return httpx.post(f"{gateway.url}/v1/embeddings", files=files, timeout=120)

    try:
        responses = []
        with ThreadPoolExecutor(8) as pool:
            for _ in range(5):  # rounds of 8 parallel requests of 16 images, until one is turned away
                responses += list(pool.map(post, range(8)))
                if any(r.status_code == 429 for r in responses):
                    break
        rejected = [r for r in responses if r.status_code == 429]
        served = [r for r in responses if r.status_code == 200]
        assert rejected and served and len(rejected) + len(served) == len(responses), \
            [r.status_code for r in responses]
        for r in rejected:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "overloaded"
        for r in served:
            assert len(r.json()["data"]) == 16
        m = metric_samples(gateway.url)
        assert sample(m, "dinoserve_rejected_requests_total") == len(rejected)
        assert sample(m, "dinoserve_requests_total", method="POST", endpoint="/v1/embeddings",
                      status="429") == len(rejected)
        assert sample(m, "dinoserve_inference_inflight") == 0
        assert sample(m, "dinoserve_inference_inflight_limit") == 1
    finally:
        gateway.stop()


def test_inference_past_the_deadline_gets_504_and_readiness_stays(triton, tmp_path):
    gateway = start(DEMO_BUNDLE, tmp_path / "gateway",
                    ["--triton-url", triton.triton_url, "--inference-timeout-s", "0.001"])
    try:
        for _ in range(3):
            response = httpx.post(f"{gateway.url}/v1/embeddings", files=image_files(4), timeout=60)
            assert response.status_code == 504, response.text
            assert response.json()["error"]["code"] == "backend_timeout"
        # The warm-up has its own deadline, and readiness checks do not share the inference deadline.
        assert httpx.get(f"{gateway.url}/readyz").status_code == 200
    finally:
        gateway.stop()


def test_requests_cut_off_by_the_deadline_leave_the_triton_connections_usable(triton):
    card = ModelCard.load(DEMO_BUNDLE)
    pixels = np.zeros((8, 3, card.preprocess.crop, card.preprocess.crop), dtype=np.float32)

    async def cut_off_then_answer() -> np.ndarray:
        backend = TritonBackend(triton.triton_url, card, timeout_s=0.005)
        try:
            # More than the client's pool of 100 connections: a connection left checked out by a cancelled
            # request would make the last request wait for one until its own deadline.
            for _ in range(110):
                with pytest.raises(ApiError) as cut:
                    await backend.infer(pixels, ("embedding",))
                assert cut.value.status == 504 and cut.value.code == "backend_timeout"
            return (await backend.infer(pixels, ("embedding",), timeout_s=60))["embedding"]
        finally:
            await backend.close()

    assert asyncio.run(cut_off_then_answer()).shape == (8, card.embed_dim)


def test_gateway_answers_503_while_triton_is_down_and_recovers_when_it_is_back(tmp_path):
    port = free_port()
    first = start(DEMO_BUNDLE, tmp_path / "triton-1", triton_port=port)
    gateway = None
    try:
        gateway = start(DEMO_BUNDLE, tmp_path / "gateway", ["--triton-url", first.triton_url])

        def embed() -> httpx.Response:
            return httpx.post(f"{gateway.url}/v1/embeddings", files=image_files(1), timeout=60)

        assert embed().status_code == 200
        assert first.stop() == 0

        down = embed()
        assert down.status_code == 503 and down.json()["error"]["code"] == "backend_unavailable"
        ready = httpx.get(f"{gateway.url}/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"

        second = start(DEMO_BUNDLE, tmp_path / "triton-2", triton_port=port)
        try:
            assert second.triton_url == first.triton_url
            assert httpx.get(f"{gateway.url}/readyz").status_code == 200
            back = embed()
            assert back.status_code == 200 and len(back.json()["data"]) == 1
            assert gateway.proc.poll() is None  # the same gateway process throughout
        finally:
            second.stop()
    finally:
        first.stop()
        if gateway is not None:
            gateway.stop()
