"""API keys (``Authorization: Bearer <key>``, read and write scopes): the key-file parser and key store, when
the gateway requires keys or refuses to start, and a real gateway with keys from a file and from the
environment — 401 with a Bearer challenge, 403 for a read key on a write endpoint, open health and demo
endpoints, the OpenAPI security scheme, the demo page's key form and ``dinoserve index add`` with a key."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

import service.auth
from collections_helpers import b64, jpeg
from conftest import BIN
from serving import Server
from service.auth import ApiKeys, AuthConfigError, Scope, file_entries, gateway_keys, list_entries, load_api_keys
from service.embedded_triton import free_port
from service.settings import Settings

FILE_READ = "file-read-key-0123456789"
FILE_WRITE = "file-write-key-0123456789"
ENV_READ = "env-read-key-0123456789ab"
ENV_BOTH = "env-read-and-write-key-0123"  # no scope: read and write
READ_KEYS = (FILE_READ, ENV_READ)
WRITE_KEYS = (FILE_WRITE, ENV_BOTH)
KEY_FILE = f"""\
# dinoserve keys of the test gateway
{FILE_READ}:read   # the demo page

{FILE_WRITE}:write
"""
CHROMIUM = Path("/usr/bin/chromium")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def without_key_settings() -> dict[str, str]:
    """This process's environment without any DINOSERVE_* variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DINOSERVE_")}


# ---------------------------------------------------------------------------------------------- key entries

def test_key_file_parser_skips_comments_and_blank_lines_and_reads_scopes():
    entries = file_entries(KEY_FILE, "keys.txt")
    assert entries == [("keys.txt line 2", f"{FILE_READ}:read"), ("keys.txt line 4", f"{FILE_WRITE}:write")]
    keys = ApiKeys(entries)
    assert len(keys) == 2 and keys.count(Scope.READ) == 1 and keys.count(Scope.WRITE) == 1
    assert keys.scope_of(FILE_READ) is Scope.READ and keys.scope_of(FILE_WRITE) is Scope.WRITE


def test_environment_entries_are_comma_separated_and_a_bare_key_reads_and_writes():
    entries = list_entries(f" {ENV_READ}:read , {ENV_BOTH},", "DINOSERVE_API_KEYS")
    assert entries == [("DINOSERVE_API_KEYS entry 1", f"{ENV_READ}:read"), ("DINOSERVE_API_KEYS entry 2", ENV_BOTH)]
    keys = ApiKeys(entries)
    assert keys.scope_of(ENV_READ) is Scope.READ and keys.scope_of(ENV_BOTH) is Scope.WRITE


@pytest.mark.parametrize("line, message", [
    ("short-key:read", "keys need at least 16"),
    (f"{FILE_WRITE}:admin", "unknown scope 'admin'"),
    (f"{FILE_WRITE} read", "only letters, digits"),
    (f"{FILE_READ}:read", "the same key as keys.txt line 2"),
])
def test_a_malformed_key_line_is_refused_naming_its_line_and_not_the_key(line, message):
    text = f"# keys\n{FILE_READ}:read\n\n{line}\n"
    with pytest.raises(ValueError, match=message) as refused:
        ApiKeys(file_entries(text, "keys.txt"))
    assert str(refused.value).startswith("keys.txt line 4: ")
    assert FILE_READ not in str(refused.value) and FILE_WRITE not in str(refused.value)


def test_keys_come_from_the_environment_variable_and_the_file_together(tmp_path, monkeypatch):
    path = tmp_path / "api-keys"
    path.write_text(KEY_FILE)
    monkeypatch.setenv("DINOSERVE_API_KEYS", f"{ENV_READ}:read,{ENV_BOTH}")
    monkeypatch.setenv("DINOSERVE_API_KEYS_FILE", str(path))
    settings = Settings.load()
    assert settings.api_keys_file == path
    assert ENV_READ not in repr(settings) and ENV_BOTH not in repr(settings)  # the keys are secrets
    keys = load_api_keys(settings)
    assert [keys.scope_of(k) for k in (*READ_KEYS, *WRITE_KEYS)] == [Scope.READ] * 2 + [Scope.WRITE] * 2
    monkeypatch.setenv("DINOSERVE_API_KEYS_FILE", "")
    assert Settings.load().api_keys_file is None
    with pytest.raises(ValueError, match=f"cannot read the API keys file {tmp_path / 'missing'}"):
        load_api_keys(Settings(api_keys_file=tmp_path / "missing"))


def test_the_key_store_keeps_digests_only_and_compares_every_one_with_compare_digest(monkeypatch):
    keys = ApiKeys(list_entries(",".join([f"{FILE_READ}:read", FILE_WRITE, ENV_READ, ENV_BOTH]), "env"))
    assert not any(key in repr(vars(keys)) for key in (*READ_KEYS, *WRITE_KEYS))
    calls, original = [], service.auth.hmac.compare_digest

    def compare_digest(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(service.auth.hmac, "compare_digest", compare_digest)
    for key, scope in ((FILE_READ, Scope.READ), (ENV_BOTH, Scope.WRITE), ("an-unknown-key-0123456789", None)):
        calls.clear()
        assert keys.scope_of(key) is scope
        assert len(calls) == len(keys)  # the first, the last and no match alike: no early exit
        assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in calls)


# ---------------------------------------------------------------------------------------------- when keys are needed

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_on_loopback_without_keys_auth_is_off(host):
    assert gateway_keys(Settings(host=host)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example"])
def test_off_loopback_without_keys_the_gateway_refuses_to_start_unless_auth_is_off(host):
    with pytest.raises(AuthConfigError, match=f"refusing to serve on {host} without API keys") as refused:
        gateway_keys(Settings(host=host))
    assert "DINOSERVE_API_KEYS" in str(refused.value) and "DINOSERVE_AUTH=off" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert gateway_keys(Settings(host=host, auth="off")) is None


def test_configured_keys_turn_auth_on_anywhere_and_off_ignores_them():
    for host in ("127.0.0.1", "0.0.0.0"):
        keys = gateway_keys(Settings(host=host, api_keys=f"{FILE_READ}:read"))
        assert keys is not None and keys.scope_of(FILE_READ) is Scope.READ
    assert gateway_keys(Settings(host="0.0.0.0", api_keys=f"{FILE_READ}:read", auth="off")) is None


def test_auth_on_without_keys_and_an_empty_key_source_refuse_to_start(tmp_path):
    with pytest.raises(AuthConfigError, match="auth is on but no API keys are configured"):
        gateway_keys(Settings(auth="on"))
    empty = tmp_path / "api-keys"
    empty.write_text("# no keys yet\n")
    with pytest.raises(AuthConfigError, match=f"no API keys in {empty}"):
        gateway_keys(Settings(api_keys_file=empty))


def test_a_non_loopback_bind_without_keys_exits_with_a_one_line_error(bundle):
    result = subprocess.run(
        [str(BIN / "dinoserve"), "serve", "--host", "0.0.0.0", "--port", str(free_port()),
         "--repository", str(bundle.parent), "--model", bundle.name],
        capture_output=True, text=True, timeout=120, env=without_key_settings())
    assert result.returncode == 2  # a configuration error
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dinoserve serve: refusing to serve on 0.0.0.0 without API keys: set DINOSERVE_API_KEYS=")
    assert "DINOSERVE_AUTH=off" in last and "via Triton" not in result.stdout


def test_a_malformed_keys_file_stops_serve_naming_the_line(bundle, tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(f"{FILE_READ}:read\n{FILE_WRITE}:admin\n")
    result = subprocess.run(
        [str(BIN / "dinoserve"), "serve", "--port", str(free_port()), "--api-keys-file", str(path),
         "--repository", str(bundle.parent), "--model", bundle.name],
        capture_output=True, text=True, timeout=120, env=without_key_settings())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"dinoserve serve: {path} line 2: unknown scope 'admin': "
                                                      "an entry is KEY, KEY:read or KEY:write")


# ---------------------------------------------------------------------------------------------- a real gateway

@pytest.fixture(scope="module")
def secured(server, bundle, tmp_path_factory):
    """A gateway (the session server's Triton) with two keys from DINOSERVE_API_KEYS_FILE and two from
    DINOSERVE_API_KEYS."""
    folder = tmp_path_factory.mktemp("auth")
    (folder / "api-keys").write_text(KEY_FILE)
    gateway = Server(bundle, folder / "serve.log", ["--triton-url", server.triton_url],
                     env={"DINOSERVE_API_KEYS_FILE": str(folder / "api-keys"),
                          "DINOSERVE_API_KEYS": f"{ENV_READ}:read,{ENV_BOTH}"})
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def api(secured):
    with httpx.Client(base_url=secured.url, timeout=120) as client:
        yield client


@pytest.fixture
def collection(api):
    """A new collection with one item, made with a write key."""
    name = f"auth-{uuid.uuid4().hex[:8]}"
    assert api.put(f"/v1/collections/{name}", headers=bearer(FILE_WRITE)).status_code == 201
    added = api.post(f"/v1/collections/{name}/items", headers=bearer(FILE_WRITE),
                     json={"items": [{"id": "first", "image": b64(jpeg(0)), "label": "a"}]})
    assert added.status_code == 200, added.text
    return name


def test_health_demo_page_and_docs_need_no_key(api):
    for path in ("/healthz", "/readyz", "/", "/static/demo.js", "/static/demo.css", "/demo/samples",
                 "/demo/samples/0.jpg", "/docs", "/openapi.json"):
        assert api.get(path).status_code == 200, path


def test_a_missing_key_is_401_with_a_bearer_challenge(api):
    requests = [("GET", "/v1/models"), ("GET", "/v1/collections"), ("PUT", "/v1/collections/nokey"),
                ("POST", "/v1/embeddings"), ("POST", "/v1/segment"), ("POST", "/v1/classify")]
    for method, path in requests:
        for headers in ({}, {"Authorization": f"Basic {FILE_WRITE}"}, {"Authorization": "Bearer"}):
            response = api.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == 'Bearer realm="dinoserve"'
            assert response.json()["error"]["code"] == "missing_api_key"
            assert "Authorization: Bearer <key>" in response.json()["error"]["message"]
    assert "nokey" not in [c["name"] for c in api.get("/v1/collections", headers=bearer(FILE_READ)).json()["data"]]


def test_an_unknown_key_is_401(api):
    for key in ("an-unknown-key-0123456789", f"{FILE_READ}:read", FILE_READ.upper()):
        response = api.get("/v1/models", headers=bearer(key))
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="dinoserve", error="invalid_token"'
        assert response.json() == {"error": {"code": "invalid_api_key", "message": "unknown API key"}}


def test_a_read_key_is_403_on_every_endpoint_that_changes_a_collection(api, collection):
    changes = [("PUT", f"/v1/collections/{collection}-2", {}),
               ("DELETE", f"/v1/collections/{collection}", {}),
               ("POST", f"/v1/collections/{collection}/items", {"json": {"items": [{"id": "x", "vector": [1.0]}]}}),
               ("DELETE", f"/v1/collections/{collection}/items/first", {})]
    for key in READ_KEYS:
        for method, path, body in changes:
            response = api.request(method, path, headers=bearer(key), **body)
            assert response.status_code == 403, (method, path)
            assert response.json()["error"]["code"] == "insufficient_scope"
            assert response.headers["www-authenticate"].endswith('error="insufficient_scope"')
    described = api.get(f"/v1/collections/{collection}", headers=bearer(FILE_READ)).json()
    assert described["count"] == 1
    assert api.get(f"/v1/collections/{collection}-2", headers=bearer(FILE_READ)).status_code == 404


def test_a_read_key_embeds_segments_searches_and_classifies(api, collection):
    image = jpeg(1)
    for key in READ_KEYS:
        auth = bearer(key)
        assert api.get("/v1/models", headers=auth).json()["data"][0]["name"] == "tiny"
        embedded = api.post("/v1/embeddings", headers=auth, files={"images": ("a.jpg", image)})
        assert embedded.status_code == 200 and len(embedded.json()["data"]) == 1
        assert api.post("/v1/segment", headers=auth, files={"image": ("a.jpg", image)}).status_code == 200
        found = api.post(f"/v1/collections/{collection}/search", headers=auth, json={"image": b64(image), "k": 1})
        assert [hit["id"] for hit in found.json()["results"]] == ["first"]
        voted = api.post("/v1/classify", headers=auth, json={"collection": collection, "images": [b64(image)]})
        assert voted.json()["data"][0]["label"] == "a"
        listed = api.get(f"/v1/collections/{collection}/items", headers=auth).json()["data"]
        assert [item["id"] for item in listed] == ["first"]
        assert api.get(f"/v1/collections/{collection}/items/first", headers=auth).status_code == 200


def test_a_write_key_creates_fills_reads_and_deletes(api):
    for key in WRITE_KEYS:
        auth, name = bearer(key), f"auth-{uuid.uuid4().hex[:8]}"
        assert api.put(f"/v1/collections/{name}", headers=auth).status_code == 201
        added = api.post(f"/v1/collections/{name}/items", headers=auth,
                         json={"items": [{"id": "one", "image": b64(jpeg(2))}]})
        assert added.json()["ids"] == ["one"]
        found = api.post(f"/v1/collections/{name}/search", headers=auth, json={"image": b64(jpeg(2)), "k": 1})
        assert [hit["id"] for hit in found.json()["results"]] == ["one"]
        assert api.delete(f"/v1/collections/{name}/items/one", headers=auth).json() == {"id": "one", "deleted": True}
        assert api.delete(f"/v1/collections/{name}", headers=auth).json() == {"name": name, "deleted": True}


def test_openapi_declares_the_bearer_scheme_where_it_is_enforced(api):
    spec = api.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    writes = {("put", "/v1/collections/{name}"), ("delete", "/v1/collections/{name}"),
              ("post", "/v1/collections/{name}/items"), ("delete", "/v1/collections/{name}/items/{item_id}")}
    operations = [(method, path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    assert writes <= {(method, path) for method, path, _ in operations}
    for method, path, op in operations:
        if path.startswith("/v1/"):
            assert op["security"] == [{"ApiKey": []}] and "401" in op["responses"], (method, path)
            assert ("403" in op["responses"]) == ((method, path) in writes), (method, path)
        else:
            assert "security" not in op and "401" not in op["responses"], (method, path)


def test_a_loopback_gateway_without_keys_is_open_and_declares_no_security(server):
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert "securitySchemes" not in spec["components"]
    assert not [path for path, ops in spec["paths"].items() for op in ops.values() if "security" in op]


def test_index_add_sends_the_key_from_the_environment(secured, tmp_path):
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    (folder / "0.jpg").write_bytes(jpeg(3))
    name = f"auth-{uuid.uuid4().hex[:8]}"
    args = [str(BIN / "dinoserve"), "index", "add", name, str(tmp_path / "photos"), "--url", secured.url, "--quiet"]
    refused = subprocess.run(args, capture_output=True, text=True, timeout=300, env=without_key_settings())
    assert refused.returncode != 0 and f"collection {name}: 401 this endpoint needs an API key" in refused.stderr
    added = subprocess.run(args, capture_output=True, text=True, timeout=300,
                           env={**without_key_settings(), "DINOSERVE_API_KEY": FILE_WRITE})
    assert added.returncode == 0, added.stderr
    items = httpx.get(f"{secured.url}/v1/collections/{name}/items", headers=bearer(FILE_READ), timeout=30).json()
    assert [(item["id"], item["label"]) for item in items["data"]] == [("cat/0.jpg", "cat")]


def test_the_demo_page_asks_for_a_key_keeps_it_in_session_storage_and_sends_it(secured):
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"{secured.url}/")
            expect(page.locator("#key-form")).to_be_visible()  # /v1/models answered 401
            page.fill("#api-key", FILE_READ)
            page.click("#key-form button")
            expect(page.locator("#key-form")).to_be_hidden()
            expect(page.locator("#model")).to_contain_text("model: tiny")
            assert page.evaluate("() => sessionStorage.getItem('dinoserve-api-key')") == FILE_READ
            with page.expect_request("**/v1/segment") as segment:
                page.click(".sample >> nth=0")
            assert segment.value.all_headers()["authorization"] == f"Bearer {FILE_READ}"
            expect(page.locator(".card.loading")).to_have_count(0)
            assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
        finally:
            browser.close()
