"""Intake micro-benchmark: one JPEG's bytes → the normalised ``[3, 224, 224]`` embedding input, on one core.

Two paths of ``service/images.py``, same model card transform (shorter side 256, centre crop 224, bicubic):

- ``full``: decode at full resolution, resize the whole picture, crop (``decode_image`` + ``preprocess``,
  bit-identical to DINO's torchvision evaluation transform);
- ``draft``: decode at a reduced DCT scale (Pillow ``draft``) whose shorter side stays >= margin x 256, then
  one resize of the crop's region (``decode_for_embedding`` + ``embedding_input``, what the gateway runs).

The picture is generated, not downloaded: ``training.data.make_sample`` at 2048x1536 (3.1 MP), saved as JPEG
quality 90. The process pins itself to one core (Pillow's codecs and the element-wise NumPy used are
single-threaded anyway). A third row times libjpeg-turbo alone on the draft path's scale (``Image.draft`` +
``load``, none of our code): the floor the draft path stands on. The paths are timed in turn, one run each per
round, so that the host's drifting speed weighs on all of them alike; the medians of wall and CPU time over
``--repeats`` rounds after two warm-up rounds are reported, with the mean absolute difference of the draft
tensor to the full one (normalised units).

    python bench/intake.py
    python bench/intake.py --size 1155x866 --margins 1 2    # 1 MP, two margins
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from datetime import date

import numpy as np
from PIL import Image

from service.images import decode_for_embedding, decode_image, embedding_input, preprocess
from service.model_card import Preprocess
from training.data.synthetic import make_sample

MAX_PIXELS = 10**9


def sample_jpeg(width: int, height: int, quality: int) -> bytes:
    buf = io.BytesIO()
    make_sample(0, (width, height)).image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def median_ms(fns: list, repeats: int) -> list[tuple[float, float]]:
    """Median wall and CPU milliseconds of each of ``fns``, called in turn ``repeats`` times; on a shared
    machine the CPU time leaves out the waits for the core (the process has one thread on one core, so CPU
    time is its work)."""
    for _ in range(2):
        for fn in fns:
            fn()
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    return [(statistics.median(w) * 1000, statistics.median(c) * 1000) for w, c in zip(wall, cpu)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2048x1536", help="WIDTHxHEIGHT of the generated JPEG (default: 3.1 MP)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per path; the median is reported")
    parser.add_argument("--margins", type=int, nargs="+", default=[1],
                        help="draft margins to time (the gateway's jpeg_draft_margin; default 1)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    width, height = (int(v) for v in args.size.lower().split("x"))
    data = sample_jpeg(width, height, args.quality)
    spec = Preprocess()

    def full() -> np.ndarray:
        return preprocess(decode_image(data, MAX_PIXELS), spec)

    reference = full()
    paths = [("full decode + resize", full, None, f"{width}x{height}")]
    for margin in args.margins:
        def draft(margin=margin) -> np.ndarray:
            return embedding_input(decode_for_embedding(data, spec, MAX_PIXELS, draft_margin=margin), spec)

        decoded = decode_for_embedding(data, spec, MAX_PIXELS, draft_margin=margin)
        diff = float(np.abs(draft() - reference).mean())
        paths.append((f"draft (margin {margin}) + crop-box resize", draft, diff,
                      "x".join(map(str, decoded.image.size))))
    smallest = decode_for_embedding(data, spec, MAX_PIXELS, draft_margin=min(args.margins)).image.size

    def libjpeg_alone() -> None:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", smallest)
        img.load()

    paths.append(("libjpeg-turbo alone at the draft scale (floor)", libjpeg_alone, None, "x".join(map(str, smallest))))
    timings = median_ms([fn for _, fn, _, _ in paths], args.repeats)
    rows = [(name, timing, diff, size) for (name, _, diff, size), timing in zip(paths, timings)]
    print(f"# intake: {width}x{height} JPEG q{args.quality} ({len(data) / 1024:.0f} KiB) → [3, {spec.crop}, "
          f"{spec.crop}] float32; one core, median of {args.repeats}; {date.today()}, {cpu_name()}")
    print("| path | decoded at | median ms (wall) | median ms (CPU) | speed-up (CPU) | mean abs diff to full |")
    print("|---|---|---:|---:|---:|---:|")
    base = rows[0][1][1]
    for name, (wall, cpu), diff, decoded_size in rows:
        print(f"| {name} | {decoded_size} | {wall:.1f} | {cpu:.1f} | {base / cpu:.2f}x | "
              f"{'—' if diff is None else f'{diff:.4f}'} |")


if __name__ == "__main__":
    main()
