"""The gateway's view of Triton: KServe v2 over HTTP with binary tensors (``tritonclient.http.aio``)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import numpy as np
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from .errors import ApiError, not_ready
from .model_card import ModelCard

log = logging.getLogger(__name__)


class TritonBackend:
    """Runs the bundle's model on Triton. Several images go as one batch, split at the model's
    ``max_batch_size``; only the outputs a caller names are transferred."""

    def __init__(self, url: str, card: ModelCard, timeout_s: float = 30.0):
        self.url = url
        self.card = card
        self.timeout_s = timeout_s
        self.max_batch = int(card.raw.get("serving", {}).get("max_batch_size", 64))
        self._client: aioclient.InferenceServerClient | None = None

    @property
    def client(self) -> aioclient.InferenceServerClient:
        # Created lazily inside the running event loop (aiohttp sessions are bound to one).
        if self._client is None:
            self._client = aioclient.InferenceServerClient(self.url, conn_timeout=self.timeout_s)
        return self._client

    async def is_ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.card.name))
        except (InferenceServerException, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    async def infer(self, pixel_values: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """``pixel_values`` float32 ``[B, 3, H, W]`` → the named outputs, each with B rows."""
        parts = [await self._infer_batch(pixel_values[i:i + self.max_batch], outputs)
                 for i in range(0, len(pixel_values), self.max_batch)]
        return {name: np.concatenate([p[name] for p in parts]) for name in outputs}

    async def _infer_batch(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        tensor = httpclient.InferInput(self.card.input_name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), binary_data=True)
        requested = [httpclient.InferRequestedOutput(self.card.output_name(o), binary_data=True) for o in outputs]
        try:
            result = await asyncio.wait_for(
                self.client.infer(self.card.name, [tensor], outputs=requested), timeout=self.timeout_s
            )
        except asyncio.TimeoutError:
            raise ApiError(504, "backend_timeout", f"Triton did not answer within {self.timeout_s} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise not_ready(f"Triton at {self.url} is unreachable: {exc}") from None
        except InferenceServerException as exc:
            raise not_ready(f"Triton could not run {self.card.name}: {exc.message()}") from None
        return {o: result.as_numpy(self.card.output_name(o)) for o in outputs}

    async def close(self) -> None:
        # An open keep-alive connection makes Triton's shutdown wait its full exit timeout.
        if self._client is not None:
            await self._client.close()
            self._client = None
