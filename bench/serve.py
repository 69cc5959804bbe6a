"""End-to-end serving benchmark: ``POST /v1/embeddings`` through the real stack against in-process ONNX.

For each JPEG size (0.3, 1 and 3 megapixels by default, generated from the synthetic shapes at 4:3) and
each client concurrency (1, 4, 16, 64), clients post one image per request as multipart to ``dinoserve
serve`` (gateway + embedded Triton, the bundle's ONNX in onnxruntime behind Triton's dynamic batcher) for
``--seconds``; the table shows throughput, p50/p95/p99 latency and the ratio of the throughput to the
baseline. The baseline runs in this process: the gateway's own decode + preprocess functions
(``service.images``, the same exact intake as the gateway's default: full decode, the official transform) and
the bundle's ONNX in onnxruntime with all cores, one image after the other — what an application embedding
images itself would do. Its median latency is the floor for the concurrency-1 rows ("overhead" = gateway
median − baseline median). A third side, the model alone (onnxruntime on ready tensors, batch 8, no intake),
shows what intake costs: the table gives the gateway's throughput against it too. Both in-process sessions
have the embedded Triton's onnxruntime options (``service.triton_model.session_options``: all cores, intra-op
threads not spinning between runs), so that the ratios compare the serving stack, not two thread settings: on a
shared VM, spinning threads of an idle session took the core from the next image's intake and, with another
process on the other core, the baseline slowed to half (2026-12-04 run in docs/benchmarks.md).

The three sides are measured in alternating windows of ``--window`` seconds (baseline, model, gateway, ...)
until each has had ``--seconds``: the speed of a shared VM drifts by tens of percent over minutes, and a
baseline measured once at the start made ratios minutes apart say more about the drift than the gateway.
Every row's ratio and overhead are against the baseline windows interleaved with its own.

The clients are lean by default, as a load generator's should be: each holds one keep-alive HTTP/1.1
connection and sends a multipart request encoded once, so the milliseconds measured are the server's.
``--client httpx`` posts through httpx instead, which shows what a typical Python client adds on this
machine, where the clients share the cores with the server.

``--max-batch-size`` and ``--queue-delay-us`` take several values: the gateway is started once per combination
(the embedded Triton's dynamic batcher, ``DINOSERVE_EMBEDDED_MAX_BATCH_SIZE`` / ``_QUEUE_DELAY_US``) and every
row is measured under each, which is how the defaults in ``service/settings.py`` were chosen.

    .venv/bin/python bench/serve.py                                  # the demo bundle
    .venv/bin/python bench/serve.py --model /srv/models/dino-vits16 --seconds 30
    .venv/bin/python bench/serve.py --megapixels 1 --concurrency 1 16 --queue-delay-us 0 500 2000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from service.embedded_triton import free_port, free_ports
from service.images import decode_for_embedding, embedding_input
from core.model_card import ModelCard, latest_model_file
from service.triton_model import session_options
from service.settings import Settings
from training.data import make_sample

MEGAPIXEL_SIZES = {0.3: (640, 480), 1.0: (1152, 864), 3.0: (2048, 1536)}


def jpeg(megapixels: float) -> bytes:
    buf = io.BytesIO()
    make_sample(7, size=MEGAPIXEL_SIZES[megapixels], seed=3).image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_process(model_dir: Path, card: ModelCard, image: bytes):
    """The baseline's unit of work, warmed up: decode + preprocess + ONNX of one image, in this process;
    each call returns the milliseconds of its two parts (intake, onnxruntime)."""
    session = ort.InferenceSession(str(latest_model_file(model_dir)), session_options(0),
                                   providers=["CPUExecutionProvider"])
    name = card.output_name("embedding")

    def once() -> tuple[float, float]:
        started = time.perf_counter()
        pixels = embedding_input(decode_for_embedding(image, card.preprocess, 10 ** 9), card.preprocess)
        decoded = time.perf_counter()
        session.run([name], {card.input_name: pixels[None]})
        return (decoded - started) * 1e3, (time.perf_counter() - decoded) * 1e3

    for _ in range(3):
        once()
    return once


def model_alone(model_dir: Path, card: ModelCard, batch: int = 8):
    """The model's share, warmed up: onnxruntime on a ready ``[batch, 3, crop, crop]`` tensor (the intake of
    one real JPEG repeated), all cores; each call returns the images it embedded."""
    session = ort.InferenceSession(str(latest_model_file(model_dir)), session_options(0),
                                   providers=["CPUExecutionProvider"])
    name = card.output_name("embedding")
    pixels = np.stack([embedding_input(decode_for_embedding(jpeg(1.0), card.preprocess, 10 ** 9),
                                       card.preprocess)] * batch)

    def once() -> int:
        session.run([name], {card.input_name: pixels})
        return batch

    once()
    return once


def model_rate(once, seconds: float) -> float:
    """Images/s of ``model_alone``'s ``once`` for ``seconds``."""
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or not images:
        images += once()
    return images / (time.perf_counter() - started)


def baseline(once, seconds: float) -> tuple[float, list[float], list[tuple[float, float]]]:
    """(images/s, per-image latencies in ms, per-image (intake, onnxruntime) ms) of ``once``, one image
    after the other, for ``seconds``."""
    latencies, parts, started = [], [], time.perf_counter()
    while time.perf_counter() - started < seconds or not latencies:
        t = time.perf_counter()
        parts.append(once())
        latencies.append((time.perf_counter() - t) * 1e3)
    return len(latencies) / (time.perf_counter() - started), latencies, parts


class LeanClient:
    """The load generator's client: one keep-alive HTTP/1.1 connection per simulated client, posting a
    multipart request encoded once and reading the response by its Content-Length. A general-purpose client
    spends its own milliseconds per request on the two shared cores (httpx: about 3 ms at 1 MP, measured
    with ``--client httpx``), which a benchmark of the server should not charge to the server."""

    def __init__(self, url: str, image: bytes) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        boundary = f"dinoserve-bench-{secrets.token_hex(8)}"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="photo.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        self.request = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self) -> tuple[int, bytes]:
        """(status, body) of one request; raises ``OSError`` or ``asyncio.IncompleteReadError`` when the
        connection fails, and the next call opens a new one."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        try:
            writer.write(self.request)
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError("the server closed the connection")
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"content-length" not in headers:
                raise ConnectionAbortedError(f"response without Content-Length: {status_line!r}")
            body = await reader.readexactly(int(headers[b"content-length"]))
        except BaseException:
            self.close()
            raise
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return int(status_line.split()[1]), body

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


class HttpxClient:
    """httpx's ``AsyncClient`` posting the same request, as a typical Python application would."""

    def __init__(self, client: httpx.AsyncClient, image: bytes) -> None:
        self.client, self.image = client, image

    async def post(self) -> tuple[int, bytes]:
        try:
            response = await self.client.post("/v1/embeddings",
                                              files=[("images", ("photo.jpg", self.image, "image/jpeg"))])
        except httpx.TransportError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        return response.status_code, response.content


async def drive(url: str, image: bytes, concurrency: int, seconds: float,
                client: str = "lean") -> tuple[float, list[float], int]:
    """(images/s, latencies in ms, failed requests) of ``concurrency`` clients posting for ``seconds``."""
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as shared:
        clients = [LeanClient(url, image) if client == "lean" else HttpxClient(shared, image)
                   for _ in range(concurrency)]

        async def post(c: LeanClient | HttpxClient) -> bool:
            try:
                status, body = await c.post()
            except (OSError, asyncio.IncompleteReadError) as exc:
                print(f"request failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                return False
            if status != 200:
                print(f"request failed: {status} {body[:300]!r}", file=sys.stderr, flush=True)
            return status == 200

        try:
            await asyncio.gather(*(post(c) for c in clients))  # warm connections and batch shapes
            stop = time.perf_counter() + seconds

            async def worker(c: LeanClient | HttpxClient) -> None:
                nonlocal failures
                while time.perf_counter() < stop:
                    t = time.perf_counter()
                    ok = await post(c)
                    if ok:
                        latencies.append((time.perf_counter() - t) * 1e3)
                    else:
                        failures += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker(c) for c in clients))
            elapsed = time.perf_counter() - started
        finally:
            for c in clients:
                if isinstance(c, LeanClient):
                    c.close()
    return len(latencies) / elapsed, latencies, failures


@dataclass
class Row:
    megapixels: float
    batcher: str
    concurrency: int
    rate: float  # gateway images/s, mean over its windows
    latencies: list[float]
    failed: int
    mean_batch: float
    stages: dict[str, float]  # mean ms per request, from ``breakdown``
    local_rate: float  # in-process images/s over the interleaved baseline windows
    local_latencies: list[float]
    local_parts: list[tuple[float, float]]  # in-process (intake, onnxruntime) ms per image
    model_rate: float  # onnxruntime alone on ready tensors, batch 8, images/s over the interleaved windows

    @property
    def ratio(self) -> float:
        return self.rate / self.local_rate

    @property
    def model_ratio(self) -> float:
        return self.rate / self.model_rate


TRITON_STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def counters(gateway_url: str, metrics_url: str, model: str) -> dict[str, float]:
    """Cumulative counters of the embedded Triton (its Prometheus metrics for ``model``: requests, model
    executions, and microseconds per stage) and of the gateway (seconds per stage of its requests). Their
    differences over a row give the mean batch the dynamic batcher formed and where a request's time went."""
    def samples(url: str):
        return (sample for family in text_string_to_metric_families(httpx.get(url, timeout=10).text)
                for sample in family.samples)

    values: dict[str, float] = {}
    for sample in samples(metrics_url):
        if sample.name.startswith("nv_inference_") and sample.labels.get("model") == model:
            # the parser names counter samples ``<name>_total``, Triton's text does not
            key = f"triton_{sample.name.removeprefix('nv_inference_').removesuffix('_total')}"
            values[key] = values.get(key, 0.0) + sample.value
    for sample in samples(f"{gateway_url}/metrics"):
        if sample.name in ("dinoserve_stage_duration_seconds_sum", "dinoserve_stage_duration_seconds_count"):
            values[f"gateway_{sample.labels['stage']}_{sample.name.rsplit('_', 1)[1]}"] = sample.value
    return values


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per request between two ``counters`` readings: the gateway's decode and preprocess,
    its whole wait on Triton ("inference"), and inside that Triton's request time and its stages."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    requests = max(delta.get("triton_request_success", 0.0), 1.0)
    means = {}
    for stage in ("decode", "preprocess", "inference"):
        count = delta.get(f"gateway_{stage}_count", 0.0)
        if count:
            means[f"gateway {stage}"] = delta[f"gateway_{stage}_sum"] / count * 1e3
    means["Triton request"] = delta.get("triton_request_duration_us", 0.0) / requests / 1e3
    for stage in TRITON_STAGES:
        means[f"Triton {stage.replace('_', ' ')}"] = delta.get(f"triton_{stage}_duration_us", 0.0) / requests / 1e3
    return means


def start_server(model_dir: Path, log_path: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dinoserve"), "serve", "--repository", str(model_dir.parent),
         "--model", model_dir.name, "--port", str(port), "--demo-collection", ""],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dinoserve serve exited; see {log_path}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise TimeoutError(f"dinoserve serve not ready after 600 s; see {log_path}")


def main() -> None:
    gateway = Settings.model_fields  # the gateway's settings and their defaults
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("demo/model_repository/dinoserve-demo"),
                        help="bundle directory (<repository>/<name>) to serve and to run in-process")
    parser.add_argument("--megapixels", type=float, nargs="+", default=sorted(MEGAPIXEL_SIZES),
                        choices=sorted(MEGAPIXEL_SIZES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per row, for each side")
    parser.add_argument("--window", type=float, default=2.0,
                        help="length of the alternating baseline and gateway windows, in seconds")
    parser.add_argument("--client", choices=("lean", "httpx"), default="lean",
                        help="the clients' HTTP code: a lean keep-alive connection sending a request encoded "
                             "once (default), or httpx as a typical Python application")
    parser.add_argument("--max-batch-size", type=int, nargs="+", default=[gateway["embedded_max_batch_size"].default],
                        help="embedded Triton's max batch size(s) (default: the gateway's)")
    parser.add_argument("--queue-delay-us", type=int, nargs="+", default=[gateway["embedded_queue_delay_us"].default],
                        help="embedded Triton's dynamic-batcher queue delay(s) in microseconds "
                             "(default: the gateway's)")
    args = parser.parse_args()
    batchers = [(b, d) for b in args.max_batch_size for d in args.queue_delay_us]

    model_dir = args.model.resolve()
    card = ModelCard.load(model_dir)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-serve.log"
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, "
          f"model {card.name} ({card.arch}/{card.patch_size}, {card.embed_dim}-d), {args.seconds:.0f} s per row, "
          f"{args.client} clients")
    images = {mp: jpeg(mp) for mp in args.megapixels}
    runners = {mp: in_process(model_dir, card, images[mp]) for mp in args.megapixels}
    model_once = model_alone(model_dir, card)
    windows = max(1, math.ceil(args.seconds / args.window))

    rows = []
    for max_batch, delay in batchers:
        port, metrics_port = free_ports(2)  # distinct (two drawn one by one need not be)
        server, url = start_server(model_dir, log_path, {"DINOSERVE_EMBEDDED_MAX_BATCH_SIZE": str(max_batch),
                                                         "DINOSERVE_EMBEDDED_QUEUE_DELAY_US": str(delay),
                                                         "DINOSERVE_TRITON_METRICS_PORT": str(metrics_port)}, port)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            for mp in args.megapixels:
                for concurrency in args.concurrency:
                    local_rates, local_latencies, local_parts, rates, latencies, failed = [], [], [], [], [], 0
                    model_rates = []
                    before = counters(url, metrics_url, card.name)
                    for _ in range(windows):
                        rate, window_latencies, window_parts = baseline(runners[mp], args.window)
                        local_rates.append(rate)
                        local_latencies += window_latencies
                        local_parts += window_parts
                        model_rates.append(model_rate(model_once, args.window))
                        rate, window_latencies, window_failed = asyncio.run(
                            drive(url, images[mp], concurrency, args.window, args.client))
                        rates.append(rate)
                        latencies += window_latencies
                        failed += window_failed
                    after = counters(url, metrics_url, card.name)
                    mean_batch = ((after["triton_request_success"] - before["triton_request_success"])
                                  / max(after["triton_exec_count"] - before["triton_exec_count"], 1))
                    row = Row(mp, f"{max_batch} / {delay}", concurrency, statistics.mean(rates), latencies, failed,
                              mean_batch, breakdown(before, after), statistics.mean(local_rates), local_latencies,
                              local_parts, statistics.mean(model_rates))
                    rows.append(row)
                    print(f"  {mp} MP, batch {max_batch}, delay {delay} us, x{concurrency}: {row.rate:.1f} img/s "
                          f"({row.ratio:.2f}x; {row.model_ratio:.2f}x of the model alone), "
                          f"mean batch {mean_batch:.1f}", file=sys.stderr, flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    print("\n| JPEG | max batch / queue delay µs | concurrency | images/s | p50 ms | p95 ms | p99 ms "
          "| in-process images/s | in-process p50 ms | vs baseline | model alone images/s | vs model alone "
          "| mean batch | failed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        w, h = MEGAPIXEL_SIZES[row.megapixels]
        print(f"| {row.megapixels:g} MP ({w}x{h}, {len(images[row.megapixels]) / 1e3:.0f} kB) | {row.batcher} | "
              f"{row.concurrency} | {row.rate:.1f} | {percentile(row.latencies, 50):.1f} | "
              f"{percentile(row.latencies, 95):.1f} | {percentile(row.latencies, 99):.1f} | {row.local_rate:.1f} | "
              f"{percentile(row.local_latencies, 50):.1f} | {row.ratio:.2f}x | {row.model_rate:.1f} | "
              f"{row.model_ratio:.2f}x | {row.mean_batch:.1f} | {row.failed} |")
    print("\nconcurrency-1 latency overhead (gateway p50 - in-process p50 of the interleaved windows):")
    for row in rows:
        if row.concurrency == 1:
            overhead = percentile(row.latencies, 50) - percentile(row.local_latencies, 50)
            print(f"  {row.megapixels:g} MP, batcher {row.batcher}: {overhead:+.1f} ms "
                  f"(medians of {len(row.latencies)} and {len(row.local_latencies)} images)")
            intake, model = (statistics.mean(part) for part in zip(*row.local_parts))
            print(f"    mean ms per image: in-process intake {intake:.1f}, onnxruntime {model:.1f}; "
                  + ", ".join(f"{name} {ms:.1f}" for name, ms in row.stages.items()))
    for max_batch, delay in batchers:
        batcher = f"{max_batch} / {delay}"
        saturated = [max((r for r in rows if r.megapixels == mp and r.batcher == batcher), key=lambda r: r.rate)
                     for mp in args.megapixels]
        print(f"saturation (best concurrency) vs baseline, batcher {batcher}: " + ", ".join(
            f"{row.megapixels:g} MP {row.ratio:.2f}x at {row.concurrency} ({row.model_ratio:.2f}x of the model "
            f"alone)" for row in saturated))


if __name__ == "__main__":
    main()
