"""A corpus of hostile and unusual images (issue 7), made here, posted to ``/v1/embeddings`` and ``/v1/segment``
of a real gateway (`dinoserve serve` on the session server's Triton): each gets the status README "Operations"
documents — bombs 413, truncations and empty files 400, what is not an allowed image format 415, every
pixel mode, EXIF rotation, animation and extreme shape 200 — and afterwards the gateway is as it was: ready, the
same vector for the same photo, its memory not blown up."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from collections_helpers import jpeg, own_gateway
from PIL import Image
from test_intake import encode, noise, png_header_only

# Resident memory the gateway may gain over the whole corpus: a decoded 40 MP picture is ~120 MB, and
# malloc keeps some of what was freed; a bomb that was decoded would take gigabytes.
RSS_GROWTH_LIMIT = 384 * 2**20


def truncated(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


def with_exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(noise(64, 40, seed=orientation), "JPEG", exif=exif, quality=90)


def mode_image(mode: str) -> Image.Image:
    rgba = noise(48, 32).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((48, 32)))
    if mode in ("I;16", "I", "F"):
        grey = np.asarray(noise(48, 32).convert("L"), dtype=np.float64) / 255
        values = {"I;16": (grey * 65535).astype(np.uint16), "I": (grey * 65535).astype(np.int32),
                  "F": grey.astype(np.float32)}[mode]
        return Image.fromarray(values)
    return rgba if mode == "RGBA" else rgba.convert(mode)


def palette_with_transparency() -> bytes:
    img = noise(32, 32).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"

# (name the file is posted under, bytes, status from /v1/embeddings, status from /v1/segment)
CORPUS = [
    ("bomb.png", png_header_only(100_000, 100_000), 413, 413),  # 10^10 pixels announced in ~80 bytes
    ("bomb-40mp-plus-one.png", png_header_only(40_000_001, 1), 413, 413),
    ("truncated.jpg", truncated(encode(noise(160, 120), "JPEG"), 0.5), 400, 400),
    ("truncated.png", truncated(encode(noise(160, 120), "PNG"), 0.5), 400, 400),
    ("truncated.webp", truncated(encode(noise(160, 120), "WEBP"), 0.5), 400, 400),
    ("header-only.jpg", encode(noise(160, 120), "JPEG")[:20], 400, 400),
    ("empty.jpg", b"", 400, 400),
    *[(f"mode-{mode}.{fmt.lower()}", encode(mode_image(mode), fmt), 200, 200)
      for mode, fmt in [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("RGBA", "WEBP"),
                        ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
                        ("YCbCr", "JPEG"), ("P", "BMP")]],
    ("palette-transparent.png", palette_with_transparency(), 200, 200),
    *[(f"exif-orientation-{o}.jpg", with_exif_orientation(o), 200, 200) for o in range(1, 9)],
    ("animated.gif", animated_gif(), 200, 200),
    ("one-pixel.png", encode(noise(1, 1), "PNG"), 200, 200),
    # Segmentation keeps the aspect ratio: 20000x1 leaves no row of patches (422, "too elongated").
    ("strip-20000x1.png", encode(noise(20000, 1), "PNG"), 200, 422),
    ("strip-1x20000.jpg", encode(noise(1, 20000), "JPEG"), 200, 422),
    ("page.html.jpg", b"<html><body>not a photo</body></html>", 415, 415),
    ("notes.txt.png", b"just some text\n" * 20, 415, 415),
    ("drawing.svg", SVG, 415, 415),
    ("drawing-svg.png", SVG, 415, 415),
    ("document.pdf.jpg", PDF, 415, 415),
    ("icon.ico.png", encode(noise(32, 32), "ICO"), 415, 415),
]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def embed(url: str, data: bytes) -> np.ndarray:
    response = httpx.post(f"{url}/v1/embeddings", files=[("images", ("photo.jpg", data, "image/jpeg"))], timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32)


@pytest.fixture(scope="module")
def gateway(server, bundle, tmp_path_factory):
    """A gateway process of its own (no Triton inside it), so its memory is the gateway's alone."""
    yield from own_gateway(server, bundle, tmp_path_factory, "hostile")


def test_the_corpus_has_every_kind_the_issue_names():
    names = {name for name, *_ in CORPUS}
    assert len(names) == len(CORPUS)
    for kind in ("bomb", "truncated.jpg", "truncated.png", "truncated.webp", "mode-", "exif-orientation-",
                 "animated.gif", "one-pixel", "strip-20000x1", ".svg", "pdf", "empty", "txt"):
        assert any(kind in name for name in names), kind
    assert Image.open(io.BytesIO(animated_gif())).n_frames == 3


def test_every_hostile_image_gets_its_documented_status_and_the_gateway_stays_healthy(gateway):
    url = gateway.url
    photo = jpeg(5)
    before = embed(url, photo)
    rss_before = rss_bytes(gateway.proc.pid)

    wrong = []
    for name, data, embeddings_status, segment_status in CORPUS:
        for path, field, expected in (("/v1/embeddings", "images", embeddings_status),
                                      ("/v1/segment", "image", segment_status)):
            response = httpx.post(f"{url}{path}", files=[(field, (name, data, "application/octet-stream"))],
                                  timeout=120)
            body = response.json()
            if response.status_code != expected or (expected != 200) != ("error" in body):
                wrong.append(f"{path} {name}: {response.status_code} (expected {expected}) {response.text[:200]}")
    assert not wrong, "\n".join(wrong)

    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    np.testing.assert_allclose(embed(url, photo), before, rtol=0, atol=1e-5)
    assert gateway.proc.poll() is None
    growth = rss_bytes(gateway.proc.pid) - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"gateway RSS grew by {growth / 2**20:.0f} MiB"
