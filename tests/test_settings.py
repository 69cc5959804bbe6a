"""The gateway's settings: every field reads its DINOSERVE_<FIELD> variable, command-line values win, a bad
value is refused naming the setting and where it came from; and every configuration or command-line error of
``dinoserve`` is one line on stderr with exit status 2."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN
from service.settings import Settings, SettingsError

# Every setting: its variable spelled out, a value other than the default, and the value it must become.
TWINS = {
    "repository": ("DINOSERVE_REPOSITORY", "/models", Path("/models")),
    "model": ("DINOSERVE_MODEL", "mine", "mine"),
    "host": ("DINOSERVE_HOST", "0.0.0.0", "0.0.0.0"),
    "port": ("DINOSERVE_PORT", "9100", 9100),
    "data_dir": ("DINOSERVE_DATA_DIR", "/var/lib/dinoserve", Path("/var/lib/dinoserve")),
    "vector_store": ("DINOSERVE_VECTOR_STORE", "qdrant://qdrant:6333", "qdrant://qdrant:6333"),
    "triton_url": ("DINOSERVE_TRITON_URL", "triton:8000", "triton:8000"),
    "triton_http_port": ("DINOSERVE_TRITON_HTTP_PORT", "8000", 8000),
    "triton_grpc_port": ("DINOSERVE_TRITON_GRPC_PORT", "8001", 8001),
    "triton_metrics_port": ("DINOSERVE_TRITON_METRICS_PORT", "8002", 8002),
    "embedded_max_batch_size": ("DINOSERVE_EMBEDDED_MAX_BATCH_SIZE", "8", 8),
    "embedded_queue_delay_us": ("DINOSERVE_EMBEDDED_QUEUE_DELAY_US", "500", 500),
    "triton_shared_memory": ("DINOSERVE_TRITON_SHARED_MEMORY", "off", "off"),
    "inference_timeout_s": ("DINOSERVE_INFERENCE_TIMEOUT_S", "2.5", 2.5),
    "ready_timeout_s": ("DINOSERVE_READY_TIMEOUT_S", "10", 10.0),
    "max_inflight": ("DINOSERVE_MAX_INFLIGHT", "3", 3),
    "max_images_per_request": ("DINOSERVE_MAX_IMAGES_PER_REQUEST", "5", 5),
    "max_image_pixels": ("DINOSERVE_MAX_IMAGE_PIXELS", "1000000", 1_000_000),
    "max_request_bytes": ("DINOSERVE_MAX_REQUEST_BYTES", "2048", 2048),
    "max_image_bytes": ("DINOSERVE_MAX_IMAGE_BYTES", "1024", 1024),
    "decode_workers": ("DINOSERVE_DECODE_WORKERS", "113", 113),
    "jpeg_draft_margin": ("DINOSERVE_JPEG_DRAFT_MARGIN", "2", 2),
    "log_level": ("DINOSERVE_LOG_LEVEL", "WARNING", "warning"),
    "log_format": ("DINOSERVE_LOG_FORMAT", "text", "text"),
    "demo_collection": ("DINOSERVE_DEMO_COLLECTION", "", None),  # empty: no demo collection
    "api_keys": ("DINOSERVE_API_KEYS", "a-key-of-sixteen-chars:read", "a-key-of-sixteen-chars:read"),
    "api_keys_file": ("DINOSERVE_API_KEYS_FILE", "/etc/dinoserve/keys", Path("/etc/dinoserve/keys")),
    "auth": ("DINOSERVE_AUTH", "on", "on"),
}


@pytest.fixture
def environ(monkeypatch):
    """This process's environment without DINOSERVE_* variables; set more with ``environ.setenv``."""
    for name in [name for name in os.environ if name.startswith("DINOSERVE_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def plain(value):
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def test_every_setting_reads_its_environment_variable(environ):
    assert set(TWINS) == set(Settings.model_fields), "a setting without an entry here, or an entry for none"
    defaults = Settings.load()
    for name, (variable, raw, value) in TWINS.items():
        assert plain(getattr(defaults, name)) != value, f"{name}: pick a value other than the default"
        environ.setenv(variable, raw)
    settings = Settings.load()
    assert {name: plain(getattr(settings, name)) for name in TWINS} == {n: v for n, (_, _, v) in TWINS.items()}


def test_defaults_then_environment_then_command_line(environ):
    assert (Settings.load().port, Settings.load().triton_url, Settings.load().demo_collection) == (8080, None, "demo")
    environ.setenv("DINOSERVE_PORT", "9100")
    environ.setenv("DINOSERVE_REPOSITORY", "/models")
    settings = Settings.load({"port": None, "model": "mine"})  # None: the option was not given
    assert settings.port == 9100 and settings.model_dir == Path("/models/mine")
    assert Settings.load({"port": "9000"}).port == 9000
    assert Settings.load({"demo_collection": ""}).demo_collection is None


@pytest.mark.parametrize("variable, raw, reason", [
    ("DINOSERVE_PORT", "eighty", "input should be a valid integer"),
    ("DINOSERVE_PORT", "70000", "input should be less than or equal to 65535"),
    ("DINOSERVE_MAX_INFLIGHT", "0", "input should be greater than or equal to 1"),
    ("DINOSERVE_INFERENCE_TIMEOUT_S", "0", "input should be greater than 0"),
    ("DINOSERVE_AUTH", "maybe", "input should be 'auto', 'on' or 'off'"),
    ("DINOSERVE_LOG_FORMAT", "xml", "input should be 'json' or 'text'"),
    ("DINOSERVE_TRITON_SHARED_MEMORY", "on", "input should be 'auto' or 'off'"),
    ("DINOSERVE_VECTOR_STORE", "postgres://db:5432", "use 'embedded', 'qdrant://HOST[:PORT]'"),
    ("DINOSERVE_VECTOR_STORE", "qdrant://", "use 'embedded'"),
    ("DINOSERVE_VECTOR_STORE", "qdrant://qdrant:http", "port could not be cast to integer value"),
    ("DINOSERVE_VECTOR_STORE", "qdrant://qdrant:6333/collections", "use 'embedded'"),
    ("DINOSERVE_TRITON_URL", "http://triton:8000", "use HOST:PORT of Triton's HTTP endpoint, without a scheme"),
    ("DINOSERVE_TRITON_URL", "triton", "use HOST:PORT"),
    ("DINOSERVE_TRITON_URL", "triton:99999", "use HOST:PORT"),
])
def test_a_bad_value_is_refused_in_one_line_naming_the_variable(environ, variable, raw, reason):
    environ.setenv(variable, raw)
    with pytest.raises(SettingsError) as refused:
        Settings.load()
    name = variable.removeprefix("DINOSERVE_").lower()
    assert str(refused.value).startswith(f"setting {name} ({variable}={raw!r}): {reason}")
    assert "\n" not in str(refused.value)


def test_a_bad_command_line_value_is_named_by_its_option(environ):
    environ.setenv("DINOSERVE_VECTOR_STORE", "embedded")
    with pytest.raises(SettingsError, match=r"^setting vector_store \(--vector-store='redis://cache:6379'\): use "):
        Settings.load({"vector_store": "redis://cache:6379"})
    with pytest.raises(SettingsError, match=r"^setting colour \(--colour\): extra inputs are not permitted$"):
        Settings.load({"colour": "blue"})


@pytest.mark.parametrize("store", ["embedded", "qdrant-local", "qdrant://qdrant", "qdrant://10.0.0.5:6333",
                                   "qdrants://qdrant.example:443", "qdrant://[::1]:6333"])
def test_every_documented_vector_store_form_is_accepted(environ, store):
    assert Settings.load({"vector_store": store}).vector_store == store


@pytest.mark.parametrize("url", ["triton:8000", "dinoserve-triton:8000", "triton_1:8000", "127.0.0.1:8000",
                                 "[::1]:8000"])
def test_triton_urls_are_host_and_port(environ, url):
    assert Settings.load({"triton_url": url}).triton_url == url


def dinoserve(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DINOSERVE_")}
    return subprocess.run([str(BIN / "dinoserve"), *args], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})


@pytest.mark.parametrize("args, env, line", [
    ((), {"DINOSERVE_PORT": "abc"},
     "dinoserve serve: setting port (DINOSERVE_PORT='abc'): input should be a valid integer"),
    (("--vector-store", "mongodb://db:27017"), {},
     "dinoserve serve: setting vector_store (--vector-store='mongodb://db:27017'): use 'embedded', "
     "'qdrant://HOST[:PORT]', 'qdrants://HOST[:PORT]' (TLS) or 'qdrant-local'"),
    ((), {"DINOSERVE_AUTH": "maybe"},
     "dinoserve serve: setting auth (DINOSERVE_AUTH='maybe'): input should be 'auto', 'on' or 'off'"),
    (("--port",), {}, "dinoserve serve: argument --port: expected one argument (see dinoserve serve --help)"),
    (("--colour", "blue"), {}, "dinoserve: unrecognized arguments: --colour blue (see dinoserve --help)"),
])
def test_serve_configuration_errors_are_one_line_and_exit_status_2(args, env, line):
    result = dinoserve("serve", *args, **env)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(line), result.stderr


def test_serve_without_a_bundle_names_the_repository_and_model(tmp_path):
    result = dinoserve("serve", "--repository", str(tmp_path), "--model", "absent")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"dinoserve serve: settings repository and model: no model card at {tmp_path / 'absent' / 'dinoserve.json'}: "
        f"is {tmp_path / 'absent'} a bundle written by `dinoserve export`?"]


@pytest.mark.parametrize("args, line", [
    (("train", "--epochs", "1"), "dinoserve train: --data is required (a folder or synthetic:N)"),
    (("export", "missing.pth", "--repository", "repository", "--name", "n", "--version", "0"),
     "dinoserve export: --version must be 1 or more, got 0"),
])
def test_training_and_export_options_are_checked_before_any_work(args, line, tmp_path):
    result = subprocess.run([str(BIN / "dinoserve"), *args], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (2, "", [line])
    assert list(tmp_path.iterdir()) == []  # nothing written
