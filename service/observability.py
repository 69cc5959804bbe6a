"""What every request leaves behind: a request id (``X-Request-ID``, taken from the request when it is
sane, else made up, and echoed on every response), one access log line, and its count and latency in the
Prometheus metrics. Logs are JSON objects, one a line (``log_format = json``), or plain text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Literal

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError
from .metrics import GatewayMetrics

REQUEST_ID_HEADER = "X-Request-ID"
# Visible ASCII only: the id is copied into a response header and into logs, where control characters,
# spaces or non-ASCII text could forge lines or break parsers.
_VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")
# Probes and scrapes arrive every few seconds: their access lines are logged at debug level only.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
CLIENT_CLOSED_REQUEST = 499
ACCESS_FIELDS = ("method", "path", "status", "duration_ms")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
access_log = logging.getLogger("dinoserve.access")
log = logging.getLogger(__name__)


def accepted_request_id(given: str | None) -> str:
    """``given`` when it is 1-128 visible ASCII characters, else a new random id."""
    if given is not None and _VALID_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Stamps every record with the id of the request being handled (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id, and for access lines
    method, path, status and duration_ms; a traceback goes in ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        entry.update({k: getattr(record, k) for k in ACCESS_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: Literal["json", "text"], level: str) -> None:
    """Route every logger (ours, the embedded Triton's lines, uvicorn's) through one stderr handler in
    ``log_format`` (the setting, checked by :class:`service.settings.Settings`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class ObservabilityMiddleware:
    """Pure ASGI middleware (it sees the response that the app sends, streamed or not): request id, access
    line, metrics. It also turns an exception that escaped every handler into the JSON 500 of the API, so
    that this response too carries the request id and is counted."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID_HEADER.lower().encode("latin-1"))
        rid = accepted_request_id(None if given is None else given.decode("latin-1"))
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.lower().encode("latin-1"), rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client closed the connection before its body was read: nobody to answer. Logged and counted
            # as 499 (nginx's "client closed request"), neither a client error of the API nor a server error.
            status = CLIENT_CLOSED_REQUEST
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            error = ApiError(500, "internal_error", "internal server error")
            body = json.dumps(error.body()).encode()
            await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"  # raw paths of 404s would be unbounded
            self.metrics.observe_request(scope["method"], endpoint, status, seconds)
            access_log.log(logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO,
                           "%s %s %d %.1f ms", scope["method"], scope["path"], status, seconds * 1000,
                           extra={"method": scope["method"], "path": scope["path"], "status": status,
                                  "duration_ms": round(seconds * 1000, 3)})
            request_id.reset(token)
