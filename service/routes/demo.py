"""The demo page at ``/``: plain HTML, CSS and JavaScript from ``service/static`` (no build step, nothing
loaded from other hosts) calling the public API (``/v1/segment``, collection search, ``/v1/classify``),
and the sample images it offers (``demo_samples``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..demo_samples import COLLECTION_SAMPLES, SAMPLE_COUNT, picker_samples, sample_jpeg
from ..errors import ApiError
from ..schemas import ErrorResponse
from .common import SettingsDep

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
# The page talks to this origin only; images arrive as data: URLs (API answers) or blob: URLs (uploads).
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every asset of ``service/static`` by file name: its bytes and media type (read once, at start)."""
    return {path.name: (path.read_bytes(), MEDIA_TYPES[path.suffix])
            for path in sorted(STATIC_DIR.iterdir()) if path.suffix in MEDIA_TYPES}


ASSETS = _static_files()


async def page() -> Response:
    body, media_type = ASSETS["index.html"]
    return Response(body, media_type=media_type, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    body, media_type = ASSETS[name]
    return Response(body, media_type=media_type)


async def samples(settings: SettingsDep) -> dict:
    """The demo page's sample images (synthetic shapes, one per class, not in the demo collection) and the
    demo collection's name (null when disabled)."""
    return {"collection": settings.demo_collection, "data": picker_samples()}


async def sample(index: int) -> Response:
    """Demo sample ``index`` as JPEG: the picker's samples and the demo collection's items (its thumbnails,
    ``0 .. 59``) alike. Generated on first request, the same bytes on every machine."""
    if not 0 <= index < SAMPLE_COUNT:
        raise ApiError(404, "not_found", f"no demo sample {index}: samples are 0 to {SAMPLE_COUNT - 1} "
                                         f"(0 to {COLLECTION_SAMPLES - 1} fill the demo collection)")
    return Response(await run_in_threadpool(sample_jpeg, index), media_type="image/jpeg",
                    headers={"Cache-Control": "public, max-age=86400"})


def add_routes(router: APIRouter) -> None:
    """``GET /``, ``GET /static/{name}``, ``GET /demo/samples`` and ``GET /demo/samples/{index}.jpg``."""
    router.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    router.add_api_route("/static/{name}", asset, methods=["GET"], include_in_schema=False)
    router.add_api_route("/demo/samples", samples, methods=["GET"], tags=["demo"])
    router.add_api_route("/demo/samples/{index:int}.jpg", sample, methods=["GET"], tags=["demo"],
                         response_class=Response,
                         responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorResponse}})
