"""Gateway settings: one typed object (pydantic-settings), filled from defaults, then the ``DINOSERVE_<FIELD>``
environment variable of each field (the name is generated from the field), then command-line options (which
win). Every value is checked here, once: a bad one is a :class:`SettingsError` whose one-line message names
the setting and where its value came from."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "DINOSERVE_"
STORE_FORMS = "'embedded', 'qdrant://HOST[:PORT]', 'qdrants://HOST[:PORT]' (TLS) or 'qdrant-local'"
HOST_PORT = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")
SECRET_SETTINGS = ("api_keys",)  # never repeated in an error message


class SettingsError(ValueError):
    """A setting the gateway cannot start with; the message is one line that names it."""


def _empty_is_unset(value):
    """An empty value (``DINOSERVE_DEMO_COLLECTION=``, ``--demo-collection ''``) turns an optional setting off."""
    return None if value == "" else value


EmptyIsUnset = BeforeValidator(_empty_is_unset)
Port = Annotated[int, Field(ge=1, le=65535)]
PortOrFree = Annotated[int, Field(ge=0, le=65535)]  # 0 picks a free port
Positive = Annotated[int, Field(ge=1)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    repository: Path = Path("model_repository")
    model: str = Field("dinoserve-demo", min_length=1)
    host: str = Field("127.0.0.1", min_length=1)
    port: Port = 8080
    data_dir: Path = Path("data")
    # collections (service/collections): "embedded" (SQLite + FAISS in data_dir), a Qdrant server
    # ("qdrant://HOST[:PORT]", "qdrants://" for TLS), or "qdrant-local" (qdrant-client's local mode in data_dir)
    vector_store: str = "embedded"
    # external Triton: HOST:PORT of its HTTP endpoint (no scheme, as tritonclient takes it); embedded if unset
    triton_url: Annotated[str | None, EmptyIsUnset] = None
    triton_http_port: PortOrFree = 0  # embedded Triton's ports
    triton_grpc_port: PortOrFree = 0
    triton_metrics_port: PortOrFree = 0
    # The embedded Triton's dynamic batcher. It runs the model on this machine's CPU, whatever the bundle's
    # config.pbtxt chose for a GPU Triton: on a CPU a batch costs its images' sum (no wider kernels to fill), so a
    # request should not wait for others (delay 0); requests that arrive while the model runs still queue and
    # go as one batch. docs/benchmarks.md ("Dynamic batching") has the measurement.
    embedded_max_batch_size: Positive = 64
    embedded_queue_delay_us: Annotated[int, Field(ge=0)] = 0
    # Input tensors through system shared memory when Triton runs on this host and accepts the region ("auto";
    # anything else falls back to binary HTTP by itself), or always in the HTTP body ("off").
    triton_shared_memory: Literal["auto", "off"] = "auto"
    # Deadline of one request's inference on Triton (504 past it); the warm-up has ready_timeout_s instead.
    inference_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    ready_timeout_s: Annotated[float, Field(gt=0)] = 120.0  # warn when the model has not answered its warm-up
    # Requests that may run the model at once (decoding, preprocessing, Triton); the next gets 429 with
    # Retry-After, never a queue (service/limits.py). 64 keeps Triton's batcher fed with up to 64 x 64 images.
    max_inflight: Positive = 64
    max_images_per_request: Positive = 64
    max_image_pixels: Positive = 40_000_000  # checked from the header, before decoding
    max_request_bytes: Positive = 64 * 1024 * 1024
    max_image_bytes: Positive = 32 * 1024 * 1024  # one image's file; 413 past it
    # Images decoded and preprocessed at once, in worker threads off the event loop (Pillow and NumPy release
    # the GIL, so each uses a core); default: the cores this process may run on.
    decode_workers: Positive = Field(default_factory=lambda: len(os.sched_getaffinity(0)))
    # 0 (default): every image is decoded at full size and the embedding is the official DINO pipeline's.
    # N > 0, lossy: JPEGs are decoded at 1/2, 1/4 or 1/8 scale while the shorter side stays >= N x the card's
    # resize (its cost and its embeddings' distance to the exact ones: docs/benchmarks.md, "Intake").
    jpeg_draft_margin: Annotated[int, Field(ge=0)] = 0
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "text"] = "json"  # json: one object a line (time, level, logger, message, ...)
    # The demo page's collection (`/`): created and filled with labelled synthetic samples on a start where it
    # is absent, never touched when present; empty disables the page's search and k-NN panels and the fill.
    demo_collection: Annotated[str | None, EmptyIsUnset] = "demo"
    # API keys (service/auth.py): entries KEY (read and write), KEY:read or KEY:write, separated by commas
    api_keys: Annotated[SecretStr | None, EmptyIsUnset] = None
    api_keys_file: Annotated[Path | None, EmptyIsUnset] = None  # one entry per line; '#' starts a comment
    # "auto": keys required when any are configured; without keys, serve on loopback only (refuse other
    # addresses). "on": keys always required. "off": every endpoint open to everyone, on any address.
    auth: Literal["auto", "on", "off"] = "auto"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    @field_validator("vector_store")
    @classmethod
    def _store_form(cls, value: str) -> str:
        if value in ("embedded", "qdrant-local"):
            return value
        try:
            url = urlsplit(value)
            port = url.port  # ValueError unless a number in 0-65535
        except ValueError as error:
            raise ValueError(f"{error}; use {STORE_FORMS}") from None
        if (url.scheme not in ("qdrant", "qdrants") or not url.hostname or port == 0 or url.path not in ("", "/")
                or url.query):
            raise ValueError(f"use {STORE_FORMS}")
        return value

    @field_validator("triton_url")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = HOST_PORT.fullmatch(value)
        if not (match and 1 <= int(match["port"]) <= 65535):
            raise ValueError("use HOST:PORT of Triton's HTTP endpoint, without a scheme (e.g. triton:8000)")
        return value

    @classmethod
    def load(cls, overrides: dict | None = None) -> "Settings":
        """Defaults, then ``DINOSERVE_*`` variables, then ``overrides`` (command-line options) whose value is
        not None. :class:`SettingsError` names the first setting at fault and where its value came from."""
        given = {name: value for name, value in (overrides or {}).items() if value is not None}
        try:
            return cls(**given)
        except ValidationError as error:
            raise SettingsError(describe(error, given)) from None

    @property
    def model_dir(self) -> Path:
        return self.repository / self.model


def env_name(setting: str) -> str:
    """The environment variable of a setting, as pydantic-settings reads it (``port``: ``DINOSERVE_PORT``)."""
    return ENV_PREFIX + setting.upper()


def describe(error: ValidationError, given: dict) -> str:
    """One line for the first error of ``error``: the setting, where its value came from (the command-line
    option when ``given`` holds it, else its environment variable), the value (never a secret's) and why."""
    first = error.errors(include_url=False)[0]
    name = str(first["loc"][0]) if first["loc"] else "settings"
    where = f"--{name.replace('_', '-')}" if name in given else env_name(name)
    value = "" if name in SECRET_SETTINGS or first["type"] == "extra_forbidden" else f"={first['input']!r}"
    reason = first["msg"].removeprefix("Value error, ")
    return f"setting {name} ({where}{value}): {reason[:1].lower()}{reason[1:]}"
