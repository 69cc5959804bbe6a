"""Regenerates ``docs/demo-page.png``, the README's picture of the demo page (``make demo-screenshot``).

Serves the committed demo bundle with an embedded Triton and a fresh data directory (so the demo collection
is filled from scratch, as on a first ``make serve``), opens the page in Debian's chromium, picks a sample,
and saves the page once every panel has its answer, reduced to a 256-colour palette to keep the file small.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from service.demo_samples import COLLECTION_SAMPLES, picker_samples
from service.embedded_triton import free_port

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "demo" / "model_repository"
TIMEOUT_S = 300


def wait_for_demo_collection(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("dinoserve serve exited before the demo collection was filled")
        try:
            response = httpx.get(f"{url}/v1/collections/demo", timeout=5)
            if response.status_code == 200 and response.json()["count"] == COLLECTION_SAMPLES:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit(f"the demo collection was not filled within {TIMEOUT_S} s")


def capture(url: str, sample: int, width: int) -> bytes:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(f"{url}/")
        page.click(f'.sample[data-index="{sample}"]')
        expect(page.locator("#results")).to_be_visible(timeout=TIMEOUT_S * 1000)
        expect(page.locator(".card.loading")).to_have_count(0, timeout=TIMEOUT_S * 1000)
        expect(page.locator(".card .error")).to_have_count(0)
        page.wait_for_load_state("networkidle")  # the neighbours' thumbnails
        png = page.screenshot(full_page=True)
        browser.close()
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "demo-page.png")
    parser.add_argument("--sample", type=int, default=picker_samples()[4]["index"],
                        help="index of the picked sample (default: the star)")
    parser.add_argument("--width", type=int, default=1200, help="browser viewport width in pixels")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "dinoserve"), "serve", "--repository", str(REPOSITORY),
             "--model", "dinoserve-demo", "--port", str(port), "--data-dir", data_dir, "--demo-collection", "demo"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_demo_collection(url, server)
            png = capture(url, args.sample, args.width)
        finally:
            server.terminate()
            server.wait(timeout=60)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    image.save(args.output, optimize=True)
    print(f"{args.output}: {image.width}x{image.height}, {args.output.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
