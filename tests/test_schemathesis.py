"""Schemathesis against a live gateway (issue 7): requests generated from the OpenAPI schema the gateway
serves — bodies, parameters and multipart image parts of arbitrary bytes, valid by the schema (positive) and
violating it (negative) — sent over HTTP to `dinoserve serve` (uvicorn, Triton behind it, collections in a
fresh data directory). No answer may be a 5xx, and every answer must be one the schema declares, with the
declared content type and body schema.

Schemathesis's own pytest decorator (``schema.parametrize()`` on a fixture) needs pytest internals that pytest
9 removed, so each operation's cases come from its Hypothesis strategy (``APIOperation.as_strategy``, the
Python API for tests outside that decorator). Deterministic (derandomized, no example database) and bounded
(``MAX_EXAMPLES`` requests per operation and mode), so CI sends the same requests on every run."""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
from collections_helpers import own_gateway
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
BOUNDED = settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def gateway(server, bundle, tmp_path_factory):
    """A gateway on the session server's Triton, with collections of its own."""
    yield from own_gateway(server, bundle, tmp_path_factory, "schemathesis")


@pytest.fixture(scope="module")
def api_schema(gateway):
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")


IMAGE_OPERATIONS = {"POST /v1/embeddings", "POST /v1/segment", "POST /v1/collections/{name}/items",
                    "POST /v1/collections/{name}/search", "POST /v1/classify"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_5xx_and_every_answer_conforms_to_the_schema(api_schema, gateway, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert IMAGE_OPERATIONS <= {operation.label for operation in operations}
    tested = set()
    for operation in operations:
        @BOUNDED
        @given(case=operation.as_strategy(generation_mode=mode))
        def call_and_check(case):
            case.call_and_validate(base_url=gateway.url, checks=CHECKS, timeout=60)

        try:
            call_and_check()
        except Unsatisfiable:
            # Only a request that breaks the schema is sent in negative mode, and an operation whose inputs
            # are free strings (an item id) or that takes none has no such request.
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        except Exception as exc:
            raise AssertionError(f"{operation.label} ({mode}): {exc}") from exc
        tested.add(operation.label)
    assert IMAGE_OPERATIONS <= tested


def test_the_schema_states_the_limits_the_gateway_enforces(gateway):
    """What made valid-by-the-schema requests get 422 before: generated clients and tests rely on these."""
    spec = httpx.get(f"{gateway.url}/openapi.json", timeout=30).json()["paths"]
    card = httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"][0]

    def multipart(path: str) -> dict:
        return spec[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]

    embeddings, segment = multipart("/v1/embeddings"), multipart("/v1/segment")
    assert embeddings["additionalProperties"] is False and embeddings["properties"]["images"]["minItems"] == 1
    assert segment["additionalProperties"] is False
    fields = segment["properties"]
    assert (fields["keep_mass"]["exclusiveMinimum"], fields["keep_mass"]["maximum"]) == (0, 1)
    assert (fields["size"]["minimum"], fields["size"]["maximum"]) == (card["patch_size"], 1024)
    assert (fields["head"]["minimum"], fields["head"]["maximum"]) == (0, card["num_heads"] - 1)
    assert re.fullmatch(fields["outputs"]["pattern"], "mask_png,rle,grid")
    assert not re.fullmatch(fields["outputs"]["pattern"], "mask_png,nothing")
    for path, operations in spec.items():
        if path.startswith("/v1/collections/{name}"):
            for operation in operations.values():
                (name,) = [p for p in operation["parameters"] if p["name"] == "name"]
                assert name["schema"]["pattern"] == "^[a-z0-9][a-z0-9_-]{0,63}$", path
