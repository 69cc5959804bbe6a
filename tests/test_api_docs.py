"""The Python walkthrough in docs/api.md runs as written against a live gateway, and the docs list every
route the gateway serves."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from collections_helpers import start_gateway

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def python_block() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return block


def test_the_python_walkthrough_runs_against_a_live_gateway(server, bundle, tmp_path):
    gateway = start_gateway(server, bundle, tmp_path / "serve.log", tmp_path / "data")
    try:
        code = python_block().replace('U = "http://127.0.0.1:8080"', f'U = "{gateway.url}"')
        assert code != python_block(), "the walkthrough must set U as documented"
        namespace: dict = {}
        exec(compile(code, str(DOC), "exec"), namespace)  # its asserts check each step
        assert namespace["added"]["added"] == 24 and len(namespace["hits"]) == 5
        assert namespace["label"]["data"][0]["label"] in {"circle", "cross", "ring", "square", "star", "triangle"}
        assert namespace["seg"]["width"] == 320 and namespace["mask_png"].startswith(b"\x89PNG")
        with httpx.Client(base_url=gateway.url) as api:
            assert api.get("/v1/collections/shapes").status_code == 404  # the walkthrough cleaned up
    finally:
        gateway.stop()


def test_every_v1_route_is_in_the_endpoint_table(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    documented = DOC.read_text()
    for path in spec["paths"]:
        if path.startswith("/v1/"):
            stem = re.sub(r"\{item_id(:path)?\}", "{id}", path)
            assert stem.split("/items")[0] in documented, path


def test_every_error_code_the_gateway_raises_is_in_the_errors_table():
    errors = DOC.read_text().split("### Errors", 1)[1].split("\n## ", 1)[0]
    raised = set()
    for path in (DOC.parent.parent / "service").rglob("*.py"):
        text = path.read_text()
        raised |= set(re.findall(r'ApiError\(\d{3}, "([a-z_]+)"', text))  # ApiError(404, "item_not_found", ...)
        raised |= set(re.findall(r'\bcode(?:: str)? ?= ?"([a-z_]+)"', text))  # bad_request(..., code="invalid_image")
    assert {"item_not_found", "invalid_image", "invalid_request", "overloaded"} <= raised  # the patterns find them
    missing = sorted(code for code in raised if f"`{code}`" not in errors)
    assert not missing, f"error codes the gateway answers but docs/api.md does not list: {missing}"
