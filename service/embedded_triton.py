"""The embedded runtime: the real ``tritonserver`` binary from the ``nvidia-pytriton`` wheel, started as a
child process, serving the bundle's ONNX through onnxruntime with Triton's dynamic batcher.

The wheel ships only Triton's Python backend, so the model is ``service/triton_model.py``, a Python-backend
model that runs the ONNX file in onnxruntime inside the backend's stub process. Clients see the same KServe v2
model (name, tensors, batching) as an NGC Triton reading the bundle's ``config.pbtxt``. Earlier versions bound
the model through PyTriton, whose stub forwards every batch over ZeroMQ to the gateway's process, where
onnxruntime competed with the decode threads (the cost of each: docs/benchmarks.md, "Serving").
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from core.model_card import OUTPUT_NAMES, ModelCard, latest_model_file

log = logging.getLogger(__name__)

ACCESS_HEADER = "triton-access-token"
# Triton APIs open only to the holder of the access token: a client that can reach the port must not map
# its own shared memory into Triton, load models or change logging.
RESTRICTED_APIS = ("shared-memory", "model-repository", "statistics", "trace", "logging")
# The Python backend's shared memory with its stub, per model instance: small to start (a container's
# /dev/shm is 64 MB by default), grown in steps as batches need it.
STUB_SHM_START_BYTES = 4 << 20
STUB_SHM_GROWTH_BYTES = 1 << 20
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
_MODEL_FILE = Path(__file__).with_name("triton_model.py")
_PR_SET_PDEATHSIG = 1


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now. The sockets stay bound until all are drawn: ports asked
    for one after another may come back equal, as the kernel hands a just-released port out again (seen:
    Triton given one port for gRPC and metrics refused to start)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _die_with_parent():
    """A ``preexec_fn`` for the child: Linux sends it SIGTERM when the gateway dies, even by SIGKILL, so that no
    orphaned Triton keeps the ports. libc is loaded here, in the parent: the child between fork and exec
    makes one plain call and no dlopen."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the gateway died before the call took effect
            os._exit(1)

    return in_child


def _tensor(name: str, dims: list[int]) -> str:
    return f'{{ name: "{name}" data_type: TYPE_FP32 dims: {json.dumps(dims)} }}'


class EmbeddedTriton:
    """``max_batch_size`` and ``queue_delay_us`` set Triton's dynamic batcher (the bundle's config.pbtxt values are
    for a GPU Triton; this one runs on the CPU); ``threads`` onnxruntime's intra-op threads (0: one per core).
    Triton's shared-memory and other administrative APIs are open to the holder of ``access_token`` only,
    which the gateway in this process sends."""

    def __init__(self, model_dir: Path, card: ModelCard, host: str = "127.0.0.1", http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, threads: int | None = None,
                 max_batch_size: int = 64, queue_delay_us: int = 0):
        self.model_dir = Path(model_dir)
        self.card = card
        self.host = host
        spare = iter(free_ports(3, host))  # distinct from each other (three drawn one by one need not be)
        self.http_port, self.grpc_port, self.metrics_port = (
            port or next(spare) for port in (http_port, grpc_port, metrics_port))
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.queue_delay_us = queue_delay_us
        self.access_token = secrets.token_urlsafe(32)
        self._process: subprocess.Popen | None = None
        self._workspace: Path | None = None
        self._log_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._log_errors: collections.deque[str] = collections.deque(maxlen=10)

    @property
    def url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def model_config(self) -> str:
        """The Python-backend twin of the bundle's ``config.pbtxt``: same name and tensors, this batcher."""
        d, heads = self.card.embed_dim, self.card.num_heads
        dims = {"embedding": [d], "attention": [heads, -1], "patch_tokens": [-1, d]}
        outputs = ",\n  ".join(_tensor(self.card.output_name(o), dims[o]) for o in OUTPUT_NAMES)
        parameters = {"onnx_path": str(latest_model_file(self.model_dir).resolve()),
                      "intra_op_threads": str(self.threads or 0)}
        return "\n".join([
            f'name: "{self.card.name}"',
            'backend: "python"',
            f"max_batch_size: {self.max_batch_size}",
            f"input [\n  {_tensor(self.card.input_name, [3, -1, -1])}\n]",
            f"output [\n  {outputs}\n]",
            f"dynamic_batching {{ max_queue_delay_microseconds: {self.queue_delay_us} }}",
            "instance_group [ { kind: KIND_CPU count: 1 } ]",
            *(f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in parameters.items()),
        ]) + "\n"

    def _prepare(self, workspace: Path) -> tuple[Path, Path, Path]:
        """(tritonserver binary, backend directory, model repository) under ``workspace``: the Python backend
        with the stub built for this interpreter's version, and the one-model repository."""
        from pytriton.utils.distribution import get_root_module_path, get_stub_path

        dist = get_root_module_path() / "tritonserver"
        python_backend = workspace / "backends" / "python"
        python_backend.mkdir(parents=True)
        for item in (dist / "backends" / "python").iterdir():
            (python_backend / item.name).symlink_to(item)
        stub = get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}")
        if not stub.is_file():
            raise RuntimeError(f"nvidia-pytriton has no Triton Python-backend stub for Python "
                               f"{sys.version_info[0]}.{sys.version_info[1]} ({stub} is missing)")
        (python_backend / "triton_python_backend_stub").symlink_to(stub)
        model = workspace / "models" / self.card.name
        (model / "1").mkdir(parents=True)
        shutil.copyfile(_MODEL_FILE, model / "1" / "model.py")
        (model / "config.pbtxt").write_text(self.model_config())
        return dist / "bin" / "tritonserver", workspace / "backends", workspace / "models"

    def _environment(self) -> dict[str, str]:
        """The stub links ``libpython3.x.so`` (the running interpreter's, not the system's) and finds its
        site-packages (numpy, onnxruntime) from the first ``python3`` on PATH: this interpreter's."""
        from pytriton.utils.distribution import get_libs_path

        env = dict(os.environ)
        libraries = [sysconfig.get_config_var("LIBDIR"), str(get_libs_path()), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _arguments(self, binary: Path, backends: Path, models: Path, shm_prefix: str) -> list[str]:
        restricted = f"{','.join(RESTRICTED_APIS)}:{ACCESS_HEADER}={self.access_token}"
        return [
            str(binary), f"--model-repository={models}", f"--backend-directory={backends}",
            "--model-control-mode=explicit", f"--load-model={self.card.name}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={STUB_SHM_START_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={STUB_SHM_GROWTH_BYTES}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
            "--exit-timeout-secs=5", "--log-verbose=0",
        ]

    def _follow_log(self, stream) -> None:
        """Triton's output through our log handler: its error and warning lines (``E1201 ...``,
        ``error: ...``, ``W1201 ...``) at those levels, the rest at debug."""
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            self._log_tail.append(line)
            severity = line[:1] if line[1:5].isdigit() else ""
            if severity == "E" or line.startswith("error:"):
                self._log_errors.append(line)
                log.error("tritonserver: %s", line)
            elif severity == "W":
                log.warning("tritonserver: %s", line)
            else:
                log.debug("tritonserver: %s", line)

    def _model_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/models/{self.card.name}/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> str:
        """Start Triton and load the model; returns the HTTP ``host:port``. Raises ``RuntimeError`` with
        Triton's error lines (or the end of its log) when it exits or the model is not ready within
        ``START_TIMEOUT_S``."""
        self._workspace = Path(tempfile.mkdtemp(prefix="dinoserve-triton-"))
        try:
            binary, backends, models = self._prepare(self._workspace)
            shm_prefix = f"triton-dinoserve-{secrets.token_hex(6)}-"
            self._process = subprocess.Popen(
                self._arguments(binary, backends, models, shm_prefix), env=self._environment(),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),
            )
            threading.Thread(target=self._follow_log, args=(self._process.stdout,), name="tritonserver-log",
                             daemon=True).start()
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self._model_ready():
                if self._process.poll() is not None or time.monotonic() > deadline:
                    reason = (f"exited with status {self._process.returncode}" if self._process.poll() is not None
                              else f"did not load {self.card.name} within {START_TIMEOUT_S:.0f} s")
                    time.sleep(0.2)  # the last lines of the log
                    raise RuntimeError(f"the embedded Triton {reason}: "
                                       + "\n".join(self._log_errors or self._log_tail))
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        log.info("embedded Triton (pid %d) serving %s at http://%s (metrics on port %d; dynamic batching up "
                 "to %d, queue delay %d us)", self._process.pid, self.card.name, self.url, self.metrics_port,
                 self.max_batch_size, self.queue_delay_us)
        return self.url

    def stop(self) -> None:
        """SIGTERM (Triton finishes the requests it holds, for up to 5 s), SIGKILL past ``STOP_TIMEOUT_S``;
        then the workspace goes."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("the embedded Triton did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        workspace, self._workspace = self._workspace, None
        if workspace is not None:
            shutil.rmtree(workspace, ignore_errors=True)
