"""bench/serve.py's lean load-generator client speaks HTTP correctly to the real gateway: the numbers it
measures are those of real, complete requests."""

import asyncio
import io
import json

import httpx
import numpy as np
from PIL import Image

from bench.serve import LeanClient


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_lean_client_gets_the_same_embedding_as_httpx_on_one_connection(server):
    image = jpeg_bytes()
    expected = httpx.post(f"{server.url}/v1/embeddings", files=[("images", ("a.jpg", image, "image/jpeg"))],
                          timeout=60)
    assert expected.status_code == 200

    async def three_posts():
        client = LeanClient(server.url, image)
        try:
            answers = [await client.post() for _ in range(3)]
            return answers, client.streams is not None
        finally:
            client.close()

    answers, kept_alive = asyncio.run(three_posts())
    assert kept_alive
    for status, body in answers:
        assert status == 200
        assert json.loads(body)["data"][0]["embedding"] == expected.json()["data"][0]["embedding"]


def test_lean_client_reads_an_error_answer_and_keeps_its_connection(server):
    async def posts():
        client = LeanClient(server.url, b"this is not a picture")
        try:
            first = await client.post()
            streams = client.streams
            second = await client.post()
            return first, second, streams is not None and client.streams is streams
        finally:
            client.close()

    (status, body), (status2, _), same_connection = asyncio.run(posts())
    assert status == status2 == 415
    assert json.loads(body)["error"]["code"]
    assert same_connection
