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


READY_CHECK_TIMEOUT_S = 2.0  # below the readiness probes' own timeouts (3 s in deploy/k8s)


class TritonBackend:
    """Runs the bundle's model on Triton. Several images go as one batch, split at the model's
    ``max_batch_size``; only the outputs a caller names are transferred. ``timeout_s`` is the deadline of
    one request's inference, all its batches together (504 past it)."""

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
            # No session-wide timeout: each call has its own (readiness checks, inference deadlines).
            self._client = aioclient.InferenceServerClient(self.url, conn_timeout=None)
        return self._client

    async def is_ready(self) -> bool:
        """Triton answers and reports the model ready; False when it is down, unreachable or loading."""
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                return bool(await self.client.is_model_ready(self.card.name))
        except (InferenceServerException, aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def infer(self, pixel_values: np.ndarray, outputs: tuple[str, ...],
                    timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """``pixel_values`` float32 ``[B, 3, H, W]`` → the named outputs, each with B rows. 504
        ``backend_timeout`` after ``timeout_s`` (default: the backend's deadline), 503 when Triton is
        unreachable or cannot run the model. A request given up on is cancelled in aiohttp, which closes
        its connection instead of returning it to the pool, so the next request gets a clean one."""
        deadline = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(deadline):
                parts = [await self._infer_batch(pixel_values[i:i + self.max_batch], outputs)
                         for i in range(0, len(pixel_values), self.max_batch)]
        except TimeoutError:
            raise ApiError(504, "backend_timeout", f"Triton did not answer within {deadline} s") from None
        return {name: np.concatenate([p[name] for p in parts]) for name in outputs}

    async def _infer_batch(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        tensor = httpclient.InferInput(self.card.input_name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), binary_data=True)
        requested = [httpclient.InferRequestedOutput(self.card.output_name(o), binary_data=True) for o in outputs]
        try:
            result = await self.client.infer(self.card.name, [tensor], outputs=requested)
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
