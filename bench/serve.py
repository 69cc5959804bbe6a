"""End-to-end serving benchmark: ``POST /v1/embeddings`` through the real stack against in-process ONNX.

For each JPEG size (0.3, 1 and 3 megapixels by default, generated from the synthetic shapes at 4:3) and
each client concurrency (1, 4, 16, 64), clients post one image per request as multipart to ``dinoserve
serve`` (gateway + embedded Triton, the bundle's ONNX in onnxruntime behind Triton's dynamic batcher) for
``--seconds``; the table shows throughput, p50/p95/p99 latency and the ratio of the throughput to the
baseline. The baseline runs in this process, in the same session: the gateway's own decode + preprocess
functions (``service.images``, the same reduced-scale JPEG decode) and the bundle's ONNX in onnxruntime with
all cores, one image after the other — what an application embedding images itself would do. Its median latency is the floor for the
concurrency-1 rows ("overhead" = gateway median − baseline median).

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
import os
import platform
import re
import signal
import subprocess
import sys
import time
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


def baseline(model_dir: Path, card: ModelCard, image: bytes, seconds: float) -> tuple[float, list[float]]:
    """(images/s, per-image latencies in ms) of decode + preprocess + ONNX, one image at a time."""
    session = ort.InferenceSession(str(latest_model_file(model_dir)), providers=["CPUExecutionProvider"])
    name = card.output_name("embedding")

    def once() -> None:
        pixels = embedding_input(decode_for_embedding(image, card.preprocess, 10 ** 9), card.preprocess)
        session.run([name], {card.input_name: pixels[None]})

    for _ in range(3):
        once()
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < 5:
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
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per row")
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
    floors = {mp: baseline(model_dir, card, images[mp], args.seconds) for mp in args.megapixels}

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
                    requests_before, runs_before = triton_counts(metrics_url, card.name)
                    rate, latencies, failed = asyncio.run(drive(url, images[mp], concurrency, args.seconds))
                    requests_after, runs_after = triton_counts(metrics_url, card.name)
                    mean_batch = (requests_after - requests_before) / max(runs_after - runs_before, 1)
                    rows.append((mp, f"{max_batch} / {delay}", concurrency, rate, latencies, failed, mean_batch))
                    print(f"  {mp} MP, batch {max_batch}, delay {delay} us, x{concurrency}: {rate:.1f} img/s, "
                          f"mean batch {mean_batch:.1f}", file=sys.stderr, flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    print("\n| JPEG | path | max batch / queue delay µs | concurrency | images/s | p50 ms | p95 ms | p99 ms "
          "| vs baseline | mean batch | failed |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mp in args.megapixels:
        w, h = MEGAPIXEL_SIZES[mp]
        rate, latencies = floors[mp]
        label = f"{mp:g} MP ({w}x{h}, {len(images[mp]) / 1e3:.0f} kB)"
        print(f"| {label} | in-process ONNX | — | 1 | {rate:.1f} | {percentile(latencies, 50):.1f} | "
              f"{percentile(latencies, 95):.1f} | {percentile(latencies, 99):.1f} | 1.00x | 1 | 0 |")
        for row_mp, batcher, concurrency, gw_rate, gw_latencies, failed, mean_batch in rows:
            if row_mp == mp:
                print(f"| {label} | gateway + Triton | {batcher} | {concurrency} | {gw_rate:.1f} | "
                      f"{percentile(gw_latencies, 50):.1f} | {percentile(gw_latencies, 95):.1f} | "
                      f"{percentile(gw_latencies, 99):.1f} | {gw_rate / rate:.2f}x | {mean_batch:.1f} | {failed} |")
    print("\nconcurrency-1 latency overhead (gateway p50 - baseline p50):")
    for row_mp, batcher, concurrency, _, gw_latencies, _, _ in rows:
        if concurrency == 1:
            overhead = percentile(gw_latencies, 50) - percentile(floors[row_mp][1], 50)
            print(f"  {row_mp:g} MP, batcher {batcher}: {overhead:+.1f} ms (median of {len(gw_latencies)} requests)")
    for max_batch, delay in batchers:
        batcher = f"{max_batch} / {delay}"
        saturated = [(mp, max((r for r in rows if r[0] == mp and r[1] == batcher), key=lambda r: r[3]))
                     for mp in args.megapixels]
        print(f"saturation (best concurrency) vs baseline, batcher {batcher}: " + ", ".join(
            f"{mp:g} MP {row[3] / floors[mp][0]:.2f}x at {row[2]}" for mp, row in saturated))


if __name__ == "__main__":
    main()
