"""Gateway settings: one object, filled from ``DINOSERVE_<OPTION>`` environment variables and then
from command-line options (which win)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "DINOSERVE_"


@dataclass(frozen=True)
class Settings:
    repository: Path = Path("model_repository")
    model: str = "dinoserve-demo"
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    # collections: "embedded" (SQLite + FAISS in data_dir), "qdrant://host:port", or "qdrant-local"
    vector_store: str = "embedded"
    triton_url: str | None = None  # external Triton (host:port of its HTTP endpoint); embedded if unset
    triton_http_port: int = 0  # embedded Triton's ports; 0 picks a free one
    triton_grpc_port: int = 0
    triton_metrics_port: int = 0
    # The embedded Triton's dynamic batcher. It runs the model on this machine's CPU, whatever the bundle's
    # config.pbtxt chose for a GPU Triton: on a CPU a batch costs its images' sum (no wider kernels to fill), so a
    # request should not wait for others (delay 0); requests that arrive while the model runs still queue and
    # go as one batch. docs/benchmarks.md ("Dynamic batching") has the measurement.
    embedded_max_batch_size: int = 64
    embedded_queue_delay_us: int = 0
    # Input tensors through system shared memory when Triton runs on this host and accepts the region ("auto";
    # anything else falls back to binary HTTP by itself), or always in the HTTP body ("off").
    triton_shared_memory: str = "auto"
    # Deadline of one request's inference on Triton (504 past it); the warm-up has ready_timeout_s instead.
    inference_timeout_s: float = 30.0
    ready_timeout_s: float = 120.0  # warn when the model has not answered its warm-up for this long
    # Requests that may run the model at once (decoding, preprocessing, Triton); the next gets 429 with
    # Retry-After, never a queue (service/limits.py). 64 keeps Triton's batcher fed with up to 64 x 64 images.
    max_inflight: int = 64
    max_images_per_request: int = 64
    max_image_pixels: int = 40_000_000  # checked from the header, before decoding
    max_request_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 32 * 1024 * 1024  # one image's file; 413 past it
    # Images decoded and preprocessed at once, in worker threads off the event loop (Pillow and NumPy release
    # the GIL, so each uses a core); default: the cores this process may run on.
    decode_workers: int = len(os.sched_getaffinity(0))
    # JPEGs are decoded at 1/2, 1/4 or 1/8 scale while the shorter side stays >= this x the card's resize
    # (service/images.py: mean |diff| ~0.01 of the normalised tensor, 3-4x faster); 0: full decode, exact.
    jpeg_draft_margin: int = 1
    log_level: str = "info"
    log_format: str = "json"  # "json": one JSON object a line (time, level, logger, message, request_id, ...); "text"
    # The demo page's collection (`/`): created and filled with labelled synthetic samples on a start where it
    # is absent, never touched when present; empty disables the page's search and k-NN panels and the fill.
    demo_collection: str | None = "demo"
    # API keys (service/auth.py): entries KEY (read and write), KEY:read or KEY:write, separated by commas
    api_keys: str | None = None
    api_keys_file: Path | None = None  # one entry per line; '#' starts a comment
    # "auto": keys required when any are configured; without keys, serve on loopback only (refuse other
    # addresses). "on": keys always required. "off": every endpoint open to everyone, on any address.
    auth: str = "auto"

    @classmethod
    def load(cls, overrides: dict | None = None, environ: dict | None = None) -> "Settings":
        """Defaults, then ``DINOSERVE_*`` variables, then ``overrides`` whose value is not None."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if overrides and overrides.get(f.name) is not None:
                raw = overrides[f.name]
            if raw is None:
                continue
            values[f.name] = _coerce(f.name, f.type, raw)
        return cls(**values)

    @property
    def model_dir(self) -> Path:
        return self.repository / self.model


def _coerce(name: str, type_name: str, raw):
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "Path":
            return Path(raw)
        if type_name == "Path | None":
            return Path(raw) if raw != "" else None
        return str(raw) if raw != "" else None
    except ValueError:
        raise ValueError(f"setting {name} ({ENV_PREFIX}{name.upper()}): {raw!r} is not a valid {type_name}") from None
