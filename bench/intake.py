"""Intake benchmark: one JPEG's bytes → the normalised ``[3, 224, 224]`` embedding input, on one core, against
the decoder's own floor; and, with ``--bundle``, what the lossy reduced-scale decode does to embeddings.

Timing (the default). The rows, same model card transform (shorter side 256, centre crop 224, bicubic):

- ``libjpeg-turbo full decode (floor)``: Pillow's ``open`` + ``load`` of the JPEG, none of our code: what any
  exact intake has to pay before it can resize;
- ``exact (default)``: ``decode_for_embedding`` + ``embedding_input`` as the gateway runs them with
  ``jpeg_draft_margin`` 0, bit-identical to the official pipeline (the bench checks it against the next row);
- ``torchvision (official pipeline)``: DINO's ``Resize(256, bicubic) → CenterCrop(224) → ToTensor →
  Normalize`` on PIL's full decode, one torch thread;
- for each ``--margins`` value: the reduced-scale decode (``draft_margin`` N, lossy), and libjpeg-turbo alone
  at that scale (its floor).

The paths are timed in turn, one run each per round, so that the host's drifting speed and other processes
weigh on all of them alike; the medians of wall and CPU time over ``--repeats`` rounds after two warm-up
rounds are reported, with ours minus the floor. The process pins itself to one core (Pillow's codecs and
resize and the NumPy used are single-threaded anyway). The picture is generated, not downloaded:
``training.data.make_sample`` at ``--size`` (default 2048x1536, 3.1 MP), JPEG quality 90; ``--image`` times a
file instead.

Fidelity (``--bundle DIR``): scikit-image's bundled photographs (``PHOTOS``), each at its own size and resized
to 3 MP (2048 on the long side), saved as JPEG quality 90, go through the exact path and the reduced-scale
path of each margin, and the bundle's ONNX (onnxruntime) embeds both; the cosine of each draft embedding to
the exact one is printed per photo, with the mean absolute difference of the tensors.

    python bench/intake.py
    python bench/intake.py --size 1152x864 --margins 1 2
    python bench/intake.py --bundle runs/bench-models/dino-official-vits16 --margins 1 2
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from service.images import decode_for_embedding, embedding_input
from core.model_card import ModelCard, Preprocess, latest_model_file
from core.synthetic import make_sample

MAX_PIXELS = 10**9
# scikit-image's bundled colour photographs (no download): name → skimage.data function
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def intake(data: bytes, spec: Preprocess, margin: int = 0) -> np.ndarray:
    return embedding_input(decode_for_embedding(data, spec, MAX_PIXELS, draft_margin=margin), spec)


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


def official_pipeline(spec: Preprocess):
    """torchvision's transform of DINO's evaluation (``eval_knn.py``), imported here only: the gateway has no
    torch."""
    import torch
    from torchvision import transforms as T

    torch.set_num_threads(1)
    transform = T.Compose([T.Resize(spec.resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(spec.crop),
                           T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    return lambda data: transform(Image.open(io.BytesIO(data)).convert("RGB")).numpy()


def timing(args, spec: Preprocess) -> None:
    if args.image:
        data = args.image.read_bytes()
        width, height = Image.open(io.BytesIO(data)).size
        what = f"{args.image.name} ({width}x{height})"
    else:
        width, height = (int(v) for v in args.size.lower().split("x"))
        data = encode_jpeg(make_sample(0, (width, height)).image, args.quality)
        what = f"{width}x{height} synthetic JPEG q{args.quality}"
    official = official_pipeline(spec)
    exact = intake(data, spec)
    reference = official(data)

    def floor() -> None:
        Image.open(io.BytesIO(data)).load()

    # (name, function, decoded size, max abs diff to the official tensor, index of its floor row or None)
    rows = [("libjpeg-turbo full decode (floor)", floor, f"{width}x{height}", None, None),
            ("exact (default): decode + resize + crop + normalise", lambda: intake(data, spec), f"{width}x{height}",
             float(np.abs(exact - reference).max()), 0),
            ("torchvision (official pipeline)", lambda: official(data), f"{width}x{height}", 0.0, 0)]
    for margin in args.margins:
        decoded = decode_for_embedding(data, spec, MAX_PIXELS, draft_margin=margin).image.size

        def draft_floor(size=decoded) -> None:
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", size)
            img.load()

        rows.append((f"libjpeg-turbo alone at 1/{round(width / decoded[0])} scale", draft_floor,
                     "x".join(map(str, decoded)), None, None))
        rows.append((f"draft margin {margin} (lossy)", lambda m=margin: intake(data, spec, m),
                     "x".join(map(str, decoded)), float(np.abs(intake(data, spec, margin) - reference).max()),
                     len(rows) - 1))
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    timings = median_ms([row[1] for row in rows], args.repeats)
    print(f"# intake: {what}, {len(data) / 1024:.0f} KiB → [3, {spec.crop}, {spec.crop}] float32; one core, "
          f"median of {args.repeats} interleaved rounds; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{cpu_name()}, load average {os.getloadavg()[0]:.1f}")
    print("| path | decoded at | median ms (wall) | median ms (CPU) | above its floor (CPU) "
          "| max abs diff to official |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, _, size, diff, floor_row), (wall, cpu) in zip(rows, timings):
        above = "—" if floor_row is None else f"{cpu - timings[floor_row][1]:+.1f}"
        print(f"| {name} | {size} | {wall:.1f} | {cpu:.1f} | {above} | {'—' if diff is None else f'{diff:.4f}'} |")


def fidelity(args, spec: Preprocess) -> None:
    import onnxruntime as ort
    import skimage.data

    bundle = args.bundle.resolve()
    card = ModelCard.load(bundle)
    spec = card.preprocess
    session = ort.InferenceSession(str(latest_model_file(bundle)), providers=["CPUExecutionProvider"])
    output = card.output_name("embedding")

    def embed(pixels: np.ndarray) -> np.ndarray:
        return session.run([output], {card.input_name: pixels[None]})[0][0].astype(np.float64)

    print(f"# draft fidelity: {card.name} ({card.arch}/{card.patch_size}, {card.embed_dim}-d, source "
          f"{card.raw.get('source', {}).get('format', 'dinoserve')}); scikit-image photos as JPEG q{args.quality}; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| photo | JPEG size | " + " | ".join(f"margin {m}: decoded at, cosine to exact, mean abs diff"
                                                 for m in args.margins) + " |")
    print("|---|---|" + "---|" * len(args.margins))
    cosines = {m: [] for m in args.margins}
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = 2048 / max(photo.size)
        for img in (photo, photo.resize((round(photo.width * scale), round(photo.height * scale)),
                                        Image.Resampling.BICUBIC)):
            data = encode_jpeg(img, args.quality)
            exact = intake(data, spec)
            reference = embed(exact)
            cells = []
            for margin in args.margins:
                decoded = decode_for_embedding(data, spec, MAX_PIXELS, draft_margin=margin)
                draft = embedding_input(decoded, spec)
                vector = embed(draft)
                cosine = float(vector @ reference / (np.linalg.norm(vector) * np.linalg.norm(reference)))
                cosines[margin].append(cosine)
                cells.append(f"{'x'.join(map(str, decoded.image.size))}, {cosine:.6f}, "
                             f"{float(np.abs(draft - exact).mean()):.4f}")
            print(f"| {name} | {img.width}x{img.height} | " + " | ".join(cells) + " |")
    for margin, values in cosines.items():
        print(f"margin {margin}: cosine to exact min {min(values):.6f}, median {statistics.median(values):.6f} "
              f"over {len(values)} JPEGs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2048x1536", help="WIDTHxHEIGHT of the generated JPEG (default: 3.1 MP)")
    parser.add_argument("--image", type=Path, help="time this JPEG file instead of a generated one")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds; the median is reported")
    parser.add_argument("--margins", type=int, nargs="*", default=[1],
                        help="reduced-scale (lossy) margins to compare (the gateway's jpeg_draft_margin)")
    parser.add_argument("--bundle", type=Path,
                        help="bundle directory: measure the draft margins' embedding cosine to the exact path")
    args = parser.parse_args()
    if args.bundle:
        fidelity(args, Preprocess())
    else:
        timing(args, Preprocess())


if __name__ == "__main__":
    main()
