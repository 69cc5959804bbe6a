"""``POST /v1/embeddings``: images → their CLS embeddings."""

from __future__ import annotations

import base64

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..request_body import ERROR_RESPONSES, IMAGE_FILES, Multipart, read_request, request_body
from ..schemas import EmbeddingsRequest, EmbeddingsResponse
from .common import CardDep, InferenceDep, SettingsDep

FORM = Multipart(files={"images": "images"})
OPENAPI_BODY = request_body(EmbeddingsRequest, {
    "images": {**IMAGE_FILES, "minItems": 1},
    "normalize": {"type": "boolean"},
    "encoding_format": {"type": "string", "enum": ["float", "base64"]},
}, required_parts=("images",))


async def embeddings(request: Request, settings: SettingsDep, card: CardDep, inference: InferenceDep) -> Response:
    """Embed one or more images: the CLS token after the final norm (DINO's k-NN feature)."""
    body = await read_request(request, settings, EmbeddingsRequest, FORM)
    vectors = await inference.embed([image.content for image in body.images], normalize=body.normalize)
    with inference.metrics.stage("postprocess"):
        content = embeddings_json(card.name, vectors, body.encoding_format)
    return Response(content, media_type="application/json")


def embeddings_json(model: str, vectors: np.ndarray, encoding_format: str) -> bytes:
    """The ``EmbeddingsResponse`` body of float32 ``vectors`` ``[B, D]``, serialised by orjson straight from
    NumPy: each number in the shortest text that reads back as the same float32 (fewer bytes and less time
    than Pydantic writing the float64 values of ``tolist()``)."""
    if encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = list(vectors)
    return orjson.dumps({"object": "list", "model": model, "dim": vectors.shape[1], "data": [
        {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)
    ]}, option=orjson.OPT_SERIALIZE_NUMPY)


def add_routes(router: APIRouter) -> None:
    router.add_api_route("/v1/embeddings", embeddings, methods=["POST"], response_model=EmbeddingsResponse,
                         responses=ERROR_RESPONSES, openapi_extra=OPENAPI_BODY, tags=["embeddings"])
