"""``dinoserve serve``: start (or connect to) Triton, then the gateway; stop both on exit."""

from __future__ import annotations

import logging

import uvicorn

from core.model_card import ModelCard

from .app import create_app
from .auth import Scope, gateway_keys
from .embedded_triton import EmbeddedTriton
from .observability import configure_logging
from .settings import Settings, SettingsError
from .triton_backend import TritonBackend

log = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Run the gateway until it is stopped. Before anything starts, :class:`SettingsError` (one line) when
    the settings do not allow it: keys (``AuthConfigError``, e.g. a non-loopback address without keys) or a
    repository and model that are not a bundle."""
    configure_logging(settings.log_format, settings.log_level)
    keys = gateway_keys(settings)
    try:
        card = ModelCard.load(settings.model_dir)
    except (OSError, ValueError, KeyError) as error:
        raise SettingsError(f"settings repository and model: {error}") from None
    embedded = None
    url = settings.triton_url
    try:
        if url is None:
            embedded = EmbeddedTriton(settings.model_dir, card, http_port=settings.triton_http_port,
                                      grpc_port=settings.triton_grpc_port,
                                      metrics_port=settings.triton_metrics_port,
                                      max_batch_size=settings.embedded_max_batch_size,
                                      queue_delay_us=settings.embedded_queue_delay_us)
            url = embedded.start()
        backend = TritonBackend(url, card, settings.inference_timeout_s,
                                max_batch=embedded.max_batch_size if embedded else None,
                                shared_memory=settings.triton_shared_memory == "auto",
                                access_token=embedded.access_token if embedded else None)
        app = create_app(settings, card, backend, keys)
        base = f"http://{settings.host}:{settings.port}"
        auth = ("off: no API key needed" if keys is None else
                f"API keys required ({keys.count(Scope.READ)} read, {keys.count(Scope.WRITE)} write)")
        print(f"dinoserve: model {card.name} ({card.arch}/{card.patch_size}, dim {card.embed_dim}) "
              f"via Triton at {url}\n"
              f"  embeddings  POST {base}/v1/embeddings\n"
              f"  API docs         {base}/docs\n"
              f"  readiness        {base}/readyz\n"
              f"  auth             {auth}", flush=True)
        # uvloop and httptools (dependencies of the serve extra): less time per request than asyncio and h11
        # (docs/benchmarks.md); log_config None: uvicorn's records go through our handler.
        server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, loop="uvloop",
                                               http="httptools", log_level=settings.log_level,
                                               access_log=False, log_config=None))
        server.run()
        return 0 if server.started else 1
    finally:
        if embedded is not None:
            embedded.stop()
