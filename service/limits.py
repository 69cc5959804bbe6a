"""Backpressure: at most ``max_inflight`` requests of the gateway run the model at once; the next one is
answered 429 with ``Retry-After`` at once.

There is deliberately no wait queue in the gateway. Triton's dynamic batcher already queues what the
admitted requests send (bounded by the bundle's ``max_queue_size``), so the slots themselves are the
queue: a request past them would only hold its decoded images in memory while waiting, and a client or a
load balancer can retry on another replica sooner than a queue here would drain (the text-embeddings-
inference router answers 429 the same way).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import ApiError
from .metrics import GatewayMetrics

RETRY_AFTER_S = 1


class InflightLimit:
    """Slots for requests that send images to the model. The event loop is single-threaded, so a counter
    checked and changed without an ``await`` in between is exact."""

    def __init__(self, limit: int, metrics: GatewayMetrics):
        if limit < 1:
            raise ValueError(f"max_inflight must be at least 1, got {limit}")
        self.limit = limit
        self.metrics = metrics
        self.count = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the enclosed block; 429 ``overloaded`` when none is free."""
        if self.count >= self.limit:
            self.metrics.rejected.inc()
            raise ApiError(429, "overloaded",
                           f"{self.limit} inference requests are already in flight; retry in {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.count += 1
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.count -= 1
            self.metrics.inflight.dec()
