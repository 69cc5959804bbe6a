"""The embedded runtime: the real ``tritonserver`` from the ``nvidia-pytriton`` wheel, started in
this process, serving the bundle's ONNX through onnxruntime with Triton's dynamic batcher.

The wheel ships only Triton's Python backend, so the ONNX file runs in an onnxruntime session bound
to the model name through PyTriton; clients see the same KServe v2 model (name, tensors, batching) as
an NGC Triton reading ``config.pbtxt``.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sysconfig
from pathlib import Path

import numpy as np

from .model_card import OUTPUT_NAMES, ModelCard, latest_model_file

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _use_interpreter_libpython() -> None:
    """The Python-backend stub links ``libpython3.x.so``; the system copy does not match this
    interpreter's stdlib, so point the loader at the running interpreter's library directory."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(os.pathsep):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, current) if p)


def run_requested_outputs(session, input_name: str, output_names: tuple[str, ...], requests) -> list[dict]:
    """One onnxruntime run for a dynamic batch of PyTriton requests, computing only the outputs that some
    request of the batch names and returning to each request only its own (an embeddings request does not
    pay for ``patch_tokens`` crossing the Python-backend hop: ~150 KB per image at 192 dims)."""
    wanted = [n for n in output_names if any(n in r.requested_output_names for r in requests)]
    pixels = [r[input_name] for r in requests]
    values = dict(zip(wanted, session.run(wanted, {input_name: np.concatenate(pixels) if len(pixels) > 1
                                                   else pixels[0]})))
    responses, start = [], 0
    for request, batch in zip(requests, pixels):
        stop = start + len(batch)
        responses.append({n: values[n][start:stop] for n in request.requested_output_names})
        start = stop
    return responses


class EmbeddedTriton:
    """``max_batch_size`` and ``queue_delay_us`` set Triton's dynamic batcher (the bundle's config.pbtxt values are
    for a GPU Triton; this one runs on the CPU). Triton's shared-memory API is open to the holder of
    ``access_token`` only (PyTriton restricts it), which the gateway in this process sends."""

    def __init__(self, model_dir: Path, card: ModelCard, host: str = "127.0.0.1", http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, threads: int | None = None,
                 max_batch_size: int = 64, queue_delay_us: int = 0):
        self.model_dir = Path(model_dir)
        self.card = card
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.queue_delay_us = queue_delay_us
        self.access_token = secrets.token_urlsafe(32)
        self._triton = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def _infer_function(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        # Idle intra-op threads spinning for the next run would take the cores from the gateway's decoding
        # threads and event loop, which run in this same process.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(latest_model_file(self.model_dir)), options, providers=["CPUExecutionProvider"]
        )
        input_name = self.card.input_name
        names = tuple(self.card.output_name(o) for o in OUTPUT_NAMES)

        def infer(requests):
            return run_requested_outputs(session, input_name, names, requests)

        return infer

    def start(self) -> str:
        """Start Triton and load the model; returns the HTTP ``host:port``."""
        _use_interpreter_libpython()
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        d, heads = self.card.embed_dim, self.card.num_heads
        config = TritonConfig(
            http_address=self.host, http_port=self.http_port, grpc_address=self.host,
            grpc_port=self.grpc_port, metrics_address=self.host, metrics_port=self.metrics_port,
            exit_timeout_secs=5, log_verbose=0,
        )
        triton = Triton(config=config, security_config=TritonSecurityConfig(access_token=self.access_token))
        try:
            triton.bind(
                model_name=self.card.name,
                infer_func=self._infer_function(),
                inputs=[Tensor(name=self.card.input_name, dtype=np.float32, shape=(3, -1, -1))],
                outputs=[
                    Tensor(name=self.card.output_name("embedding"), dtype=np.float32, shape=(d,)),
                    Tensor(name=self.card.output_name("attention"), dtype=np.float32, shape=(heads, -1)),
                    Tensor(name=self.card.output_name("patch_tokens"), dtype=np.float32, shape=(-1, d)),
                ],
                config=ModelConfig(
                    max_batch_size=self.max_batch_size,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=self.queue_delay_us),
                ),
                strict=True,
            )
            triton.run()
        except BaseException:
            triton.stop()
            raise
        self._triton = triton
        log.info("embedded Triton serving %s at http://%s (metrics on port %d; dynamic batching up to %d, "
                 "queue delay %d us)", self.card.name, self.url, self.metrics_port, self.max_batch_size,
                 self.queue_delay_us)
        return self.url

    def stop(self) -> None:
        if self._triton is not None:
            self._triton.stop()
            self._triton = None
