"""End to end through the real stack: `dinoserve serve` starts the embedded Triton (tritonserver from
the nvidia-pytriton wheel) and the gateway on free loopback ports; answers must equal the checkpoint run
in PyTorch with DINO's evaluation transform and the ONNX file run directly in onnxruntime."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from serving import Server, process_tree
from training.export import load_backbone
from training.models import build_backbone

DINO_EVAL = T.Compose([
    T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(224),
    T.ToTensor(),
    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def jpeg(seed: int, size=(320, 240)) -> bytes:
    from training.data import make_sample

    buf = io.BytesIO()
    make_sample(seed, size=size).image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def torch_model(trained_run):
    spec, _, weights = load_backbone(trained_run / "checkpoint.pth")
    vit = build_backbone(spec)
    vit.load_state_dict(weights)
    return vit.eval()


def torch_embeddings(model, images: list[bytes]) -> np.ndarray:
    batch = torch.stack([DINO_EVAL(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.no_grad():
        return model(batch).numpy()


def test_multipart_embeddings_equal_pytorch_and_onnxruntime(server, torch_model, bundle):
    images = [jpeg(1), jpeg(2, size=(200, 300))]
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    response = httpx.post(f"{server.url}/v1/embeddings", files=files, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "tiny" and body["dim"] == 96
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "embedding"
    served = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)

    expected = torch_embeddings(torch_model, images)
    assert np.abs(served - expected).max() <= 1e-4

    session = ort.InferenceSession(str(bundle / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = torch.stack([DINO_EVAL(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]).numpy()
    (direct,) = session.run(["embedding"], {"pixel_values": pixels})
    assert np.abs(served - direct).max() <= 1e-4


def test_json_base64_embeddings_with_normalize_and_binary_output(server, torch_model):
    data = jpeg(3)
    payload = {"images": [{"data": base64.b64encode(data).decode()}], "normalize": True,
               "encoding_format": "base64"}
    response = httpx.post(f"{server.url}/v1/embeddings", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    expected = torch_embeddings(torch_model, [data])[0]
    np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-5)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("send, status, code", [
    (dict(files=[("images", ("x.txt", b"not an image", "text/plain"))]), 415, "unsupported_media_type"),
    (dict(files=[("images", ("x.jpg", jpeg(4)[:300], "image/jpeg"))]), 400, "invalid_image"),
    (dict(json={"images": [{"data": "***"}]}), 400, "invalid_base64"),
    (dict(json={"images": []}), 422, "validation_error"),
    (dict(json={"pictures": []}), 422, "validation_error"),
    (dict(content=b"raw", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    (dict(json={"images": [{"data": "aGk="}] * 65}), 413, "payload_too_large"),
])
def test_bad_requests_get_json_errors_with_the_right_status(server, send, status, code):
    response = httpx.post(f"{server.url}/v1/embeddings", timeout=60, **send)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


def test_models_health_and_docs(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["data"][0]["name"] == "tiny" and models["data"][0]["embed_dim"] == 96
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
    assert httpx.get(f"{server.url}/docs").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    content = schema["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_sigterm_stops_gateway_and_triton_cleanly(bundle, tmp_path):
    srv = Server(bundle, tmp_path / "serve.log")
    srv.wait_ready()
    children = process_tree(srv.proc.pid)
    assert children, "the embedded Triton runs as a child process"
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 20
    time.sleep(0.5)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert not alive, f"processes left behind: {alive}"
