"""A `dinoserve serve` process on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from service.embedded_triton import free_ports


def process_tree(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return children + [g for c in children for g in process_tree(c)]


class Server:
    """``args`` are added to the command line (they win over the defaults: the data directory is
    ``log``'s folder / "data"; the demo collection is off, ``--demo-collection NAME`` turns it on);
    ``triton_url`` is the embedded Triton's HTTP endpoint, for other gateways' ``--triton-url`` (on
    ``triton_port`` when given, so that a Triton can be started again where gateways expect it); ``env`` adds
    environment variables."""

    def __init__(self, bundle: Path, log: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 triton_port: int | None = None):
        self.port, spare = free_ports(2)  # two distinct ports (two drawn one by one need not be)
        self.url = f"http://127.0.0.1:{self.port}"
        self.triton_url = f"127.0.0.1:{triton_port or spare}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dinoserve"), "serve", "--repository", str(bundle.parent),
             "--model", bundle.name, "--port", str(self.port), "--data-dir", str(log.parent / "data"), *args],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "DINOSERVE_TRITON_HTTP_PORT": self.triton_url.split(":")[1],
                 "DINOSERVE_DEMO_COLLECTION": "", **(env or {})},
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{Path(self.log.name).read_text()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not ready after {timeout} s:\n{Path(self.log.name).read_text()}")

    def kill(self) -> None:
        """SIGKILL the process and its children at once: no shutdown code runs."""
        pids = [self.proc.pid, *process_tree(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a child that had just exited
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in [self.proc.pid, *process_tree(self.proc.pid)]:
                    os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
