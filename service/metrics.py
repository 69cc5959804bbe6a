"""Prometheus metrics of the gateway (``GET /metrics``), in the text exposition format.

Requests are counted and timed by route template (``/v1/collections/{name}/search``, never the raw path, so
the label set stays bounded) and status. A request's time is also split into the stages that cost it —
``decode``, ``preprocess``, ``inference`` (the Triton round trip), ``postprocess`` and ``store`` — as
text-embeddings-inference splits queue / tokenization / inference time. Each app has its own registry, so
several apps in one process do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
    generate_latest,
)

STAGES = ("decode", "preprocess", "inference", "postprocess", "store")
# Seconds: from a tiny model's milliseconds to the tens of seconds of a ViT-B batch of 64 on a CPU.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_inflight: int):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # memory, CPU, open files of the gateway process
        PlatformCollector(registry=self.registry)
        labels = ("method", "endpoint", "status")
        self.requests = Counter("dinoserve_requests", "HTTP requests answered, by route template and status",
                                labels, registry=self.registry)
        self.request_seconds = Histogram("dinoserve_request_duration_seconds",
                                         "time from request start to the end of the response", labels,
                                         buckets=REQUEST_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("dinoserve_stage_duration_seconds",
                                       "time spent in one stage of a request: " + ", ".join(STAGES), ("stage",),
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.inflight = Gauge("dinoserve_inference_inflight",
                              "requests holding an inference slot (decoding, preprocessing or waiting on Triton)",
                              registry=self.registry)
        Gauge("dinoserve_inference_inflight_limit", "inference slots (setting max_inflight)",
              registry=self.registry).set(max_inflight)
        self.rejected = Counter("dinoserve_rejected_requests",
                                "requests answered 429 because every inference slot was taken",
                                registry=self.registry)

    def observe_request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        labels = (method, endpoint, str(status))
        self.requests.labels(*labels).inc()
        self.request_seconds.labels(*labels).observe(seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block as stage ``name`` (one of ``STAGES``); usable around ``await`` too."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
