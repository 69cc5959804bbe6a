"""End-to-end serving benchmark: ``POST /v1/embeddings`` through the real stack against in-process ONNX.

For each JPEG size (0.3, 1 and 3 megapixels by default, generated from the synthetic shapes at 4:3) and
each client concurrency (1, 4, 16, 64), clients post one image per request as multipart to ``dinoserve
serve`` (gateway + embedded Triton, the bundle's ONNX in onnxruntime behind Triton's dynamic batcher) for
``--seconds``; the table shows throughput, p50/p95/p99 latency and the ratio of the throughput to the
baseline. The baseline runs in this process: the gateway's own decode + preprocess functions
(``service.images``, the same reduced-scale JPEG decode) and the bundle's ONNX in onnxruntime with all cores,
one image after the other — what an application embedding images itself would do. Its median latency is the
floor for the concurrency-1 rows ("overhead" = gateway median − baseline median).

The two sides are measured in alternating windows of ``--window`` seconds (baseline, gateway, baseline, ...)
until each has had ``--seconds``: the speed of a shared VM drifts by tens of percent over minutes, and a
baseline measured once at the start made ratios minutes apart say more about the drift than the gateway.
Every row's ratio and overhead are against the baseline windows interleaved with its own.

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
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from service.embedded_triton import free_port
from service.images import decode_for_embedding, embedding_input
from service.model_card import ModelCard, latest_model_file
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
    """The baseline's unit of work, warmed up: decode + preprocess + ONNX of one image, in this process."""
    session = ort.InferenceSession(str(latest_model_file(model_dir)), providers=["CPUExecutionProvider"])
    name = card.output_name("embedding")

    def once() -> None:
        pixels = embedding_input(decode_for_embedding(image, card.preprocess, 10 ** 9), card.preprocess)
        session.run([name], {card.input_name: pixels[None]})

    for _ in range(3):
        once()
    return once


def baseline(once, seconds: float) -> tuple[float, list[float]]:
    """(images/s, per-image latencies in ms) of ``once``, one image after the other, for ``seconds``."""
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds or not latencies:
        t = time.perf_counter()
        once()
        latencies.append((time.perf_counter() - t) * 1e3)
    return len(latencies) / (time.perf_counter() - started), latencies


async def drive(url: str, image: bytes, concurrency: int, seconds: float) -> tuple[float, list[float], int]:
    """(images/s, latencies in ms, failed requests) of ``concurrency`` clients posting for ``seconds``."""
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def post() -> bool:
            try:
                response = await client.post("/v1/embeddings", files=[("images", ("photo.jpg", image, "image/jpeg"))])
            except httpx.TransportError as exc:
                print(f"request failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                return False
            if response.status_code != 200:
                print(f"request failed: {response.status_code} {response.text[:300]}", file=sys.stderr, flush=True)
            return response.status_code == 200

        await asyncio.gather(*(post() for _ in range(concurrency)))  # warm connections and batch shapes
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal failures
            while time.perf_counter() < stop:
                t = time.perf_counter()
                ok = await post()
                if ok:
                    latencies.append((time.perf_counter() - t) * 1e3)
                else:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
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
    local_rate: float  # in-process images/s over the interleaved baseline windows
    local_latencies: list[float]

    @property
    def ratio(self) -> float:
        return self.rate / self.local_rate


def triton_counts(metrics_url: str, model: str) -> tuple[float, float]:
    """(inference requests, model executions) so far, from the embedded Triton's Prometheus metrics: their
    ratio over a row is the mean batch the dynamic batcher formed."""
    text = httpx.get(metrics_url, timeout=10).text
    counts = dict(re.findall(r'^nv_inference_(request_success|exec_count)\{[^}]*model="%s"[^}]*\} (\S+)'
                             % re.escape(model), text, re.M))
    return float(counts["request_success"]), float(counts["exec_count"])


def start_server(model_dir: Path, log_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("demo/model_repository/dinoserve-demo"),
                        help="bundle directory (<repository>/<name>) to serve and to run in-process")
    parser.add_argument("--megapixels", type=float, nargs="+", default=sorted(MEGAPIXEL_SIZES),
                        choices=sorted(MEGAPIXEL_SIZES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per row, for each side")
    parser.add_argument("--window", type=float, default=2.0,
                        help="length of the alternating baseline and gateway windows, in seconds")
    parser.add_argument("--max-batch-size", type=int, nargs="+", default=[Settings.embedded_max_batch_size],
                        help="embedded Triton's max batch size(s) (default: the gateway's)")
    parser.add_argument("--queue-delay-us", type=int, nargs="+", default=[Settings.embedded_queue_delay_us],
                        help="embedded Triton's dynamic-batcher queue delay(s) in microseconds "
                             "(default: the gateway's)")
    args = parser.parse_args()
    batchers = [(b, d) for b in args.max_batch_size for d in args.queue_delay_us]

    model_dir = args.model.resolve()
    card = ModelCard.load(model_dir)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-serve.log"
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, "
          f"model {card.name} ({card.arch}/{card.patch_size}, {card.embed_dim}-d), {args.seconds:.0f} s per row")
    images = {mp: jpeg(mp) for mp in args.megapixels}
    runners = {mp: in_process(model_dir, card, images[mp]) for mp in args.megapixels}
    windows = max(1, math.ceil(args.seconds / args.window))

    rows = []
    for max_batch, delay in batchers:
        metrics_port = free_port()
        server, url = start_server(model_dir, log_path, {"DINOSERVE_EMBEDDED_MAX_BATCH_SIZE": str(max_batch),
                                                         "DINOSERVE_EMBEDDED_QUEUE_DELAY_US": str(delay),
                                                         "DINOSERVE_TRITON_METRICS_PORT": str(metrics_port)})
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            for mp in args.megapixels:
                for concurrency in args.concurrency:
                    local_rates, local_latencies, rates, latencies, failed = [], [], [], [], 0
                    requests_before, runs_before = triton_counts(metrics_url, card.name)
                    for _ in range(windows):
                        rate, window_latencies = baseline(runners[mp], args.window)
                        local_rates.append(rate)
                        local_latencies += window_latencies
                        rate, window_latencies, window_failed = asyncio.run(
                            drive(url, images[mp], concurrency, args.window))
                        rates.append(rate)
                        latencies += window_latencies
                        failed += window_failed
                    requests_after, runs_after = triton_counts(metrics_url, card.name)
                    mean_batch = (requests_after - requests_before) / max(runs_after - runs_before, 1)
                    row = Row(mp, f"{max_batch} / {delay}", concurrency, statistics.mean(rates), latencies, failed,
                              mean_batch, statistics.mean(local_rates), local_latencies)
                    rows.append(row)
                    print(f"  {mp} MP, batch {max_batch}, delay {delay} us, x{concurrency}: {row.rate:.1f} img/s "
                          f"({row.ratio:.2f}x), mean batch {mean_batch:.1f}", file=sys.stderr, flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    print("\n| JPEG | max batch / queue delay µs | concurrency | images/s | p50 ms | p95 ms | p99 ms "
          "| in-process images/s | in-process p50 ms | vs baseline | mean batch | failed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        w, h = MEGAPIXEL_SIZES[row.megapixels]
        print(f"| {row.megapixels:g} MP ({w}x{h}, {len(images[row.megapixels]) / 1e3:.0f} kB) | {row.batcher} | "
              f"{row.concurrency} | {row.rate:.1f} | {percentile(row.latencies, 50):.1f} | "
              f"{percentile(row.latencies, 95):.1f} | {percentile(row.latencies, 99):.1f} | {row.local_rate:.1f} | "
              f"{percentile(row.local_latencies, 50):.1f} | {row.ratio:.2f}x | {row.mean_batch:.1f} | {row.failed} |")
    print("\nconcurrency-1 latency overhead (gateway p50 - in-process p50 of the interleaved windows):")
    for row in rows:
        if row.concurrency == 1:
            overhead = percentile(row.latencies, 50) - percentile(row.local_latencies, 50)
            print(f"  {row.megapixels:g} MP, batcher {row.batcher}: {overhead:+.1f} ms "
                  f"(medians of {len(row.latencies)} and {len(row.local_latencies)} images)")
    for max_batch, delay in batchers:
        batcher = f"{max_batch} / {delay}"
        saturated = [max((r for r in rows if r.megapixels == mp and r.batcher == batcher), key=lambda r: r.rate)
                     for mp in args.megapixels]
        print(f"saturation (best concurrency) vs baseline, batcher {batcher}: " + ", ".join(
            f"{row.megapixels:g} MP {row.ratio:.2f}x at {row.concurrency}" for row in saturated))


if __name__ == "__main__":
    main()
