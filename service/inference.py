"""The path every image endpoint shares from uploaded bytes to model outputs: an in-flight slot
(``limits``), decoding and preprocessing in the thread pool, then Triton — each step timed as its stage in
the metrics. ``embed`` is that path for the CLS embedding, used by every endpoint that embeds images and by
the demo collection."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import anyio
import numpy as np
from PIL import Image

from core.model_card import ModelCard

from .images import decode_for_embedding, decode_image, embedding_input
from .limits import InflightLimit
from .metrics import GatewayMetrics
from .settings import Settings
from .triton_backend import TritonBackend


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class Inference:
    def __init__(self, settings: Settings, card: ModelCard, backend: TritonBackend, metrics: GatewayMetrics):
        self.settings = settings
        self.card = card
        self.backend = backend
        self.metrics = metrics
        self.limit = InflightLimit(settings.max_inflight, metrics)
        self.decoders = anyio.CapacityLimiter(settings.decode_workers)

    def slot(self):
        """``async with inference.slot():`` around a request's model work; 429 when none is free."""
        return self.limit.slot()

    def decode(self, data: bytes) -> Image.Image:
        """One image's bytes → RGB picture (blocking: call it in the thread pool)."""
        with self.metrics.stage("decode"):
            return decode_image(data, self.settings.max_image_pixels, self.settings.max_image_bytes)

    async def off_loop(self, fn, *args):
        """``fn(*args)`` (decoding, preprocessing) in a worker thread, at most ``decode_workers`` at once."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.decoders)

    async def embed(self, images: Sequence[bytes], normalize: bool) -> np.ndarray:
        """Images → their embeddings, float32 ``[B, D]`` (the final-norm CLS token, DINO's k-NN feature),
        L2-normalised when ``normalize``: decoded and preprocessed on the decode pool, then one Triton batch,
        within one in-flight slot."""
        async with self.slot():
            result = await self.run(await self.pixel_batch(images), ("embedding",))
        with self.metrics.stage("postprocess"):
            vectors = result["embedding"].astype(np.float32, copy=False)
            return unit_rows(vectors) if normalize else vectors

    async def pixel_batch(self, images: Sequence[bytes]) -> np.ndarray:
        """Images → float32 ``[B, 3, crop, crop]`` by the model card's embedding transform."""
        def prepare(data: bytes) -> np.ndarray:
            with self.metrics.stage("decode"):
                decoded = decode_for_embedding(data, self.card.preprocess, self.settings.max_image_pixels,
                                               self.settings.max_image_bytes, self.settings.jpeg_draft_margin)
            with self.metrics.stage("preprocess"):
                return embedding_input(decoded, self.card.preprocess)

        return np.stack(await asyncio.gather(*(self.off_loop(prepare, data) for data in images)))

    async def run(self, pixel_values: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The named outputs from Triton, within the inference deadline (504 past it, 503 when down)."""
        with self.metrics.stage("inference"):
            return await self.backend.infer(pixel_values, outputs)
