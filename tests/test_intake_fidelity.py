"""Issue 19: with no settings, the gateway's intake is the official DINO pipeline's, at every size and format.

The reference is independent of our code: torchvision's evaluation transform of DINO (``eval_knn.py``:
``Resize(256, bicubic) → CenterCrop(224) → ToTensor → Normalize``) on PIL's full decode. The pictures are
scikit-image's bundled photographs, resized to each size and encoded as the formats users send. EXIF
orientation is applied on our side and not by the official loader (``ImageFolder`` opens the file as stored),
so for an EXIF-rotated file the reference is that transform of the upright picture. End to end, an
official-format DINO checkpoint exported and served with default settings answers the official pipeline's
embedding for 0.2-3 MP JPEGs.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import skimage.data
import torch
from conftest import run_cli
from official_reference import make_official_vit
from PIL import Image, ImageOps
from serving import Server
from torchvision import transforms as T

from service.images import decode_for_embedding, embedding_input
from service.inference import Inference
from service.metrics import GatewayMetrics
from core.model_card import ModelCard, Preprocess
from service.settings import Settings

SPEC = Preprocess()
LIMIT = 10**8
DINO_EVAL = T.Compose([
    T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(224),
    T.ToTensor(),
    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def official(data: bytes) -> np.ndarray:
    """The official pipeline's tensor: PIL's full decode, upright (see the module docstring), torchvision."""
    return DINO_EVAL(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).numpy()


def gateway_intake(images: list[bytes]) -> np.ndarray:
    """The gateway's own path with default settings: ``Inference.pixel_batch`` in its worker threads."""
    card = ModelCard(name="any", method="dino", arch="vit_small", patch_size=16, embed_dim=384, num_heads=6,
                     preprocess=SPEC, segmentation_size=480, raw={})
    inference = Inference(Settings(), card, backend=None, metrics=GatewayMetrics(64))  # intake only, no Triton
    return asyncio.run(inference.pixel_batch(images))


# 0.2 to 12 MP, landscape and portrait, sizes whose resize truncates, a size a DCT scale would not divide
JPEG_SIZES = [(512, 384), (600, 400), (1224, 816), (1152, 864), (2048, 1536), (1536, 2048), (2047, 1029),
              (3000, 2000), (4000, 3000)]


@pytest.mark.parametrize("size", JPEG_SIZES)
def test_default_intake_of_a_jpeg_is_the_official_tensor(size):
    data = encode(photo("astronaut", size), "JPEG", quality=90)
    np.testing.assert_array_equal(gateway_intake([data])[0], official(data))


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0 chroma
def test_progressive_jpegs_are_the_official_tensor(subsampling):
    data = encode(photo("coffee", (2048, 1365)), "JPEG", quality=85, progressive=True, subsampling=subsampling)
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    np.testing.assert_array_equal(gateway_intake([data])[0], official(data))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpegs_are_the_official_tensor_of_the_upright_picture(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo("chelsea", (1800, 1200)), "JPEG", quality=90, exif=exif)
    ours = gateway_intake([data])[0]
    np.testing.assert_array_equal(ours, official(data))
    as_stored = DINO_EVAL(Image.open(io.BytesIO(data)).convert("RGB")).numpy()  # what the official loader sees
    assert not np.array_equal(ours, as_stored)


@pytest.mark.parametrize("fmt, kwargs", [("PNG", {}), ("WEBP", {"quality": 90}), ("WEBP", {"lossless": True})])
def test_png_and_webp_are_the_official_tensor(fmt, kwargs):
    data = encode(photo("rocket", (853, 1280)), fmt, **kwargs)
    np.testing.assert_array_equal(gateway_intake([data])[0], official(data))


def test_mixed_batch_is_each_images_official_tensor():
    images = [encode(photo("retina", (1411, 1411)), "JPEG", quality=95),
              encode(photo("chelsea", (741, 497)), "PNG"),
              encode(photo("hubble_deep_field", (872, 1000)), "WEBP", quality=80)]
    batch = gateway_intake(images)
    np.testing.assert_array_equal(batch, np.stack([official(data) for data in images]))


def test_the_lossy_draft_decode_would_fail_these_comparisons():
    """The comparisons above can fail: the reduced-scale decode changes the pixels of the same 3 MP JPEG."""
    data = encode(photo("astronaut", (2048, 1536)), "JPEG", quality=90)
    draft = embedding_input(decode_for_embedding(data, SPEC, LIMIT, draft_margin=1), SPEC)
    assert np.abs(draft - official(data)).max() > 0.05


# --- end to end: an official-format checkpoint served with default settings ---------------------------------

@pytest.fixture(scope="module")
def teacher():
    return make_official_vit(seed=0)


@pytest.fixture(scope="module")
def official_bundle(teacher, tmp_path_factory):
    """`dinoserve export` of an official DINO backbone release file (``dino_deitsmall16_pretrain.pth``'s
    shape: the teacher's state dict with the official key names)."""
    folder = tmp_path_factory.mktemp("official")
    torch.save(teacher.state_dict(), folder / "dino-release.pth")
    run_cli("export", str(folder / "dino-release.pth"), "--repository", str(folder / "repository"),
            "--name", "dino-official", "--quiet")
    return folder / "repository" / "dino-official"


SERVED = [("coffee", (512, 384)), ("chelsea", (1224, 816)), ("astronaut", (1152, 864)),
          ("retina", (2048, 1536)), ("rocket", (1536, 2048))]  # 0.2 to 3.1 MP


@pytest.mark.slow
def test_served_embeddings_of_jpegs_equal_the_official_pipelines(official_bundle, teacher, tmp_path):
    jpegs = [encode(photo(name, size), "JPEG", quality=90) for name, size in SERVED]
    server = Server(official_bundle, tmp_path / "serve.log")  # no DINOSERVE_* setting of intake
    try:
        server.wait_ready()
        served = []
        for data in jpegs:
            response = httpx.post(f"{server.url}/v1/embeddings", timeout=120,
                                  files=[("images", ("photo.jpg", data, "image/jpeg"))])
            assert response.status_code == 200, response.text
            served.append(np.array(response.json()["data"][0]["embedding"], dtype=np.float64))
    finally:
        server.stop()
    with torch.no_grad():
        reference = teacher(torch.stack([torch.from_numpy(official(data)) for data in jpegs])).double().numpy()
    for (name, size), ours, want in zip(SERVED, served, reference):
        cosine = ours @ want / (np.linalg.norm(ours) * np.linalg.norm(want))
        assert cosine >= 0.9999, f"{name} at {size}: cosine {cosine:.6f}"
