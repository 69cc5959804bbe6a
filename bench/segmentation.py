"""Mask quality and endpoint latency of ``POST /v1/segment`` on the synthetic shapes data.

Quality: mean IoU (Jaccard) of each foreground method against the exact object masks of held-out
synthetic images (``make_sample(index, seed=--seed, backgrounds=--backgrounds, classes=--classes)``; the
demo model trained on seed 0 with the ``train`` backgrounds, so ``--backgrounds test`` draws only kinds and
photographs it never saw), for a checkpoint and for the same architecture freshly initialised. The masks
come from the functions the endpoint uses (``core.segmentation``), at the endpoint's geometry (shorter
side ``--size``, masks back at the image size); the model runs in PyTorch through the exported graph
(``training.export.BundleGraph``, the module ``dinoserve export`` writes to ONNX; onnxruntime agrees with it
to ~1e-5).

"Best head" follows DINO's protocol of scoring a model's best head: the head is chosen on a separate
selection split (indices after the evaluation ones) and scored on the evaluation split. "Oracle head"
takes the best head of every image by its ground truth: an upper bound no endpoint can offer.

Latency (``--latency``): ``dinoserve serve`` of a bundle, a 1 MP JPEG posted as multipart with default
options, median over repeated requests after a warm-up.

    .venv/bin/python bench/segmentation.py --checkpoint demo/dinoserve-demo.pth --images 200
    .venv/bin/python bench/segmentation.py --backgrounds test --classes unseen --image-size 96
    .venv/bin/python bench/segmentation.py --latency --bundle demo/model_repository/dinoserve-demo
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from training.data import make_sample, parse_backgrounds, parse_classes

from serve import start_server  # bench/serve.py: `dinoserve serve` of a bundle, waited until ready


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def quality(args: argparse.Namespace) -> None:
    # torch only here: the latency run measures the torch-free gateway and should not share the CPU with it
    import torch

    from training.export import build_model, load_backbone
    from training.mask_quality import attention_model, scores
    from training.models import build_backbone

    spec, _, weights = load_backbone(args.checkpoint)
    torch.manual_seed(0)
    models = {"random init": build_backbone(spec).eval(),
              f"trained ({args.checkpoint.name})": build_model(spec, weights)}
    evaluation = range(args.images)
    selection = range(args.images, args.images + args.select_images)
    print(f"{spec.arch}/{spec.patch_size}, held-out synthetic seed {args.seed}, backgrounds "
          f"{'+'.join(args.backgrounds)}, classes {'+'.join(args.classes)}, images "
          f"{args.image_size[0]}x{args.image_size[1]}, size {args.size}, keep_mass {args.keep_mass}; "
          f"{len(evaluation)} evaluation images (indices 0-{evaluation[-1]}), head chosen on "
          f"{len(selection)} more; mean IoU")
    print("| model | mean | union | best head (chosen) | oracle head | tokencut |")
    print("|---|---|---|---|---|---|")
    for name, vit in models.items():
        model = attention_model(vit)
        chosen = scores(model, selection, args.seed, args.image_size, args.size, args.keep_mass,
                        spec.patch_size, f"{name}: selection", backgrounds=args.backgrounds, classes=args.classes)
        best = int(chosen["heads"].mean(axis=0).argmax())
        got = scores(model, evaluation, args.seed, args.image_size, args.size, args.keep_mass,
                     spec.patch_size, f"{name}: evaluation", backgrounds=args.backgrounds, classes=args.classes)
        print(f"| {name} | {got['mean'].mean():.3f} | {got['union'].mean():.3f} | "
              f"{got['heads'][:, best].mean():.3f} (head {best}) | {got['heads'].max(axis=1).mean():.3f} | "
              f"{got['tokencut'].mean():.3f} |", flush=True)
    truth = [make_sample(i, args.image_size, args.seed, args.backgrounds, args.classes).mask for i in evaluation]
    print(f"whole image as the mask: {np.mean([m.mean() for m in truth]):.3f}")


def one_megapixel_jpeg() -> bytes:
    buf = io.BytesIO()
    make_sample(0, size=(1152, 864), seed=1).image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def latency(args: argparse.Namespace) -> None:
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-segment.log"
    server, url = start_server(args.bundle.resolve(), log_path)
    try:
        image = one_megapixel_jpeg()
        print(f"1 MP JPEG: 1152x864, {len(image) / 1e3:.0f} kB; size = the card's default; "
              f"{args.runs} requests after 3 warm-up, one at a time")
        print("| method | outputs | median ms | p90 ms | failed |")
        print("|---|---|---|---|---|")
        with httpx.Client(timeout=120) as client:
            for method, outputs in (("mean", "mask_png,grid"), ("mean", "mask_png,rle,grid,heads,overlay"),
                                    ("tokencut", "mask_png,grid")):
                times, failures = [], []
                for run in range(3 + args.runs):
                    started = time.perf_counter()
                    response = client.post(f"{url}/v1/segment", files={"image": ("photo.jpg", image, "image/jpeg")},
                                           data={"method": method, "outputs": outputs})
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:  # counted and shown, not timed
                        failures.append(f"request {run + 1}: {response.status_code} {response.text}")
                    elif run >= 3:
                        times.append(elapsed * 1e3)
                median, p90 = ((f"{statistics.median(times):.0f}", f"{statistics.quantiles(times, n=10)[-1]:.0f}")
                               if len(times) > 1 else ("-", "-"))
                print(f"| {method} | {outputs} | {median} | {p90} | {len(failures)} |", flush=True)
                for failure in failures:
                    print(f"  {failure}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("demo/dinoserve-demo.pth"),
                        help="trained checkpoint; the random-init baseline is the same architecture")
    parser.add_argument("--images", type=int, default=200, help="evaluation images")
    parser.add_argument("--select-images", type=int, default=100, help="images to choose the best head on")
    parser.add_argument("--seed", type=int, default=1, help="synthetic data seed; the demo trains on seed 0")
    parser.add_argument("--image-size", type=parse_size, default=(160, 120), help="WxH of the synthetic images")
    parser.add_argument("--backgrounds", type=lambda text: parse_backgrounds(text.split("+")),
                        default=parse_backgrounds(["classic"]),
                        help="background kinds or groups joined by + (test: none the demo model trained on; "
                             "default: classic)")
    parser.add_argument("--classes", type=lambda text: parse_classes(text.split("+")),
                        default=parse_classes(["seen"]),
                        help="shapes or groups joined by + (seen: the trained ones, unseen: the two kept out; "
                             "default: seen)")
    parser.add_argument("--size", type=int, default=480,
                        help="shorter side of the model input (the endpoint's default)")
    parser.add_argument("--keep-mass", type=float, default=0.6, help="DINO's threshold (0.6 in the paper)")
    parser.add_argument("--latency", action="store_true", help="measure the endpoint instead of the quality")
    parser.add_argument("--bundle", type=Path, default=Path("demo/model_repository/dinoserve-demo"),
                        help="model directory to serve for --latency")
    parser.add_argument("--runs", type=int, default=20, help="timed requests per configuration for --latency")
    args = parser.parse_args()
    latency(args) if args.latency else quality(args)


if __name__ == "__main__":
    main()
