"""Steady-load test: ``POST /v1/embeddings`` at a fixed request rate for minutes against ``dinoserve serve``.

Open loop: request i is sent at start + i / rate whether or not the earlier ones have been answered, so a
slow server meets the same arrivals (its latency is counted from the scheduled send time, queueing in the
client included) instead of a politely slowed client. Every ``--report-s`` seconds a line shows the rate
answered, p50/p99 latency, errors (any answer but 200, or no answer), and the resident memory of the gateway
process and of Triton (the processes under it). At the end a table of those lines and a verdict: errors, and
memory growth from the first to the last minute (the mean of each minute's samples).

    .venv/bin/python bench/load.py                                   # demo bundle, 10 req/s, 3 minutes
    .venv/bin/python bench/load.py --rate 50 --minutes 10 --model /srv/models/dino-vits16
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from serve import jpeg, percentile, start_server


def rss_mib(pid: int) -> float:
    """Resident memory of one process in MiB (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, their children, ...), from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name (field 2) may hold spaces and parentheses: the parent id follows the last ')'.
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


@dataclass
class Window:
    """What was answered during one reporting interval, and the memory at its end."""

    end_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    gateway_mib: float = 0.0
    triton_mib: float = 0.0

    def row(self, seconds: float) -> str:
        done = len(self.latencies_ms) + self.errors
        return (f"| {self.end_s:6.0f} | {done / seconds:6.1f} | {percentile(self.latencies_ms, 50):7.1f} | "
                f"{percentile(self.latencies_ms, 99):7.1f} | {self.errors:6d} | {self.gateway_mib:8.1f} | "
                f"{self.triton_mib:8.1f} |")


HEADER = ("| t (s) | req/s | p50 ms | p99 ms | errors | gateway MiB | Triton MiB |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")


async def hold_rate(url: str, image: bytes, rate: float, seconds: float, report_s: float, server_pid: int
                    ) -> list[Window]:
    """Send ``rate`` requests a second for ``seconds``; one ``Window`` per ``report_s``, printed as it closes
    (the last ones hold the answers that came after the last send)."""
    windows: list[Window] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        files = [("images", ("photo.jpg", image, "image/jpeg"))]
        assert (await client.post("/v1/embeddings", files=files)).status_code == 200  # warm connection and model
        loop = asyncio.get_running_loop()
        start = loop.time()

        def window(index: int) -> Window:
            while len(windows) <= index:
                windows.append(Window(end_s=(len(windows) + 1) * report_s))
            return windows[index]

        async def one(scheduled: float) -> None:
            try:
                ok = (await client.post("/v1/embeddings", files=files)).status_code == 200
            except httpx.HTTPError:
                ok = False
            finished = loop.time() - start
            answered = window(int(finished // report_s))
            if ok:
                answered.latencies_ms.append((finished - scheduled) * 1e3)
            else:
                answered.errors += 1

        async def report() -> None:
            print(HEADER, flush=True)
            for index in itertools.count():
                await asyncio.sleep(max(0.0, start + (index + 1) * report_s - loop.time()))
                closed = window(index)
                closed.gateway_mib = rss_mib(server_pid)
                closed.triton_mib = sum(rss_mib(pid) for pid in descendants(server_pid))
                print(closed.row(report_s), flush=True)

        reporter = asyncio.create_task(report())
        requests = []
        for i in range(int(rate * seconds)):
            scheduled = i / rate
            await asyncio.sleep(max(0.0, start + scheduled - loop.time()))
            requests.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*requests)
        await asyncio.sleep(max(0.0, start + len(windows) * report_s - loop.time()) + 0.1)  # the last line
        reporter.cancel()
    return windows


def verdict(windows: list[Window], report_s: float, max_growth_mib: float) -> tuple[str, bool]:
    per_minute = max(1, round(60 / report_s))
    first, last = windows[:per_minute], windows[-per_minute:]
    growth = {name: float(np.mean([getattr(w, name) for w in last]) - np.mean([getattr(w, name) for w in first]))
              for name in ("gateway_mib", "triton_mib")}
    answered = sum(len(w.latencies_ms) for w in windows)
    errors = sum(w.errors for w in windows)
    steady = errors == 0 and all(g <= max_growth_mib for g in growth.values())
    line = (f"verdict: {'STEADY' if steady else 'NOT STEADY'}: {answered + errors} requests, {errors} errors; "
            f"RSS first minute -> last minute: gateway {growth['gateway_mib']:+.1f} MiB, "
            f"Triton {growth['triton_mib']:+.1f} MiB (limit +{max_growth_mib:g} MiB)")
    return line, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("demo/model_repository/dinoserve-demo"),
                        help="bundle directory (<repository>/<name>) to serve")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second, one 0.3 MP JPEG each")
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to hold the rate (at least 2, so "
                        "that the first and last minute differ)")
    parser.add_argument("--report-s", type=float, default=10.0, help="seconds per progress line")
    parser.add_argument("--max-growth-mib", type=float, default=50.0,
                        help="memory growth from the first to the last minute still called steady, per process "
                        "group (allocator arenas settle within the first minute; a leak keeps climbing)")
    args = parser.parse_args()
    if args.minutes < 2:
        parser.error("--minutes must be at least 2: the verdict compares the first minute with the last")

    image = jpeg(0.3)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-load.log"
    print(f"{args.rate:g} req/s of a {len(image) / 1e3:.0f} kB JPEG for {args.minutes:g} min against "
          f"{args.model.name} ({os.cpu_count()} cores); server log {log_path}", flush=True)
    server, url = start_server(args.model.resolve(), log_path)
    try:
        windows = asyncio.run(hold_rate(url, image, args.rate, args.minutes * 60, args.report_s, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print("\n" + HEADER)
    for window in windows:
        print(window.row(args.report_s))
    line, steady = verdict(windows, args.report_s, args.max_growth_mib)
    print(line)
    sys.exit(0 if steady else 1)


if __name__ == "__main__":
    main()
