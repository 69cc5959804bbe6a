"""The demo model's quality measured from outside, through the HTTP API of ``dinoserve serve`` (issue 20).

For a bundle and for the same architecture at random initialisation (built from the checkpoint's spec with
seed 0 and exported with the bundle's card settings into a temporary repository), each served in turn:

- **k-NN top-1**: held-out labelled images are added to a collection (``POST /v1/collections/{name}/items``,
  multipart, label = the shape) and other held-out images are classified against it (``POST /v1/classify``:
  DINO's weighted vote, k = 20, T = 0.07), once for the trained shapes and once for the two shapes never
  trained on (``core.synthetic.UNSEEN_CLASSES``);
- **mask IoU**: the default ``POST /v1/segment`` mask (the card's size, method ``mean``) of held-out images
  against their exact object masks, mean over the images.

The images are ``core.synthetic.make_sample`` pictures with seeds and backgrounds the demo's training never
used (``--backgrounds test``: the ``waves`` and ``cells`` textures and six photographs of their own), sent
as PNG so that the pixels are the generator's.

    .venv/bin/python bench/demo_quality.py   # the committed demo bundle and checkpoint
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from core.model_card import ModelCard
from core.synthetic import CLASSES, UNSEEN_CLASSES, make_sample, parse_backgrounds

from serve import start_server  # bench/serve.py: `dinoserve serve` of a bundle, waited until ready

BATCH = 64


@dataclass(frozen=True)
class Split:
    """Labelled held-out images: ``count`` samples of ``seed`` at ``size`` px."""

    count: int
    seed: int
    size: int | tuple[int, int]

    def samples(self, backgrounds: tuple[str, ...], classes: tuple[str, ...]):
        return [make_sample(i, self.size, self.seed, backgrounds, classes) for i in range(self.count)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_init_bundle(checkpoint: Path, card: ModelCard, repository: Path) -> Path:
    """The checkpoint's architecture with seed-0 initialisation, exported like the bundle (same card settings)."""
    import torch

    from training.checkpoint import backbone_file
    from training.evaluate import random_backbone
    from training.export import ExportOptions, export_bundle, load_backbone

    spec, method, _ = load_backbone(checkpoint)
    weights = random_backbone(spec, 0).state_dict()
    path = repository.parent / "random-init.pth"
    torch.save(backbone_file(spec.to_dict(), method, weights), path)
    options = ExportOptions(crop=card.preprocess.crop, resize=card.preprocess.resize,
                            segmentation_size=card.segmentation_size, verify=False, progress=False)
    return export_bundle(path, repository, "random-init", options)


def knn_top1(api: httpx.Client, name: str, train: list, val: list) -> float:
    """% of ``val`` classified as its shape against a collection of ``train``, through the API."""
    assert api.put(f"/v1/collections/{name}").status_code == 201
    for start in range(0, len(train), BATCH):
        batch = train[start:start + BATCH]
        files = [("images", (f"{start + n}.png", png(s.image), "image/png")) for n, s in enumerate(batch)]
        data = {"label": [s.class_name for s in batch], "id": [str(start + n) for n in range(len(batch))]}
        response = api.post(f"/v1/collections/{name}/items", files=files, data=data)
        response.raise_for_status()
    correct = 0
    for start in range(0, len(val), BATCH):
        batch = val[start:start + BATCH]
        files = [("images", (f"{n}.png", png(s.image), "image/png")) for n, s in enumerate(batch)]
        response = api.post("/v1/classify", files=files, data={"collection": name, "k": "20", "temperature": "0.07"})
        response.raise_for_status()
        correct += sum(row["label"] == s.class_name for row, s in zip(response.json()["data"], batch))
    return 100.0 * correct / len(val)


def mask_iou(api: httpx.Client, samples: list) -> float:
    """Mean IoU of the default ``/v1/segment`` mask against the exact object masks."""
    scores = []
    for sample in samples:
        response = api.post("/v1/segment", files=[("image", ("s.png", png(sample.image), "image/png"))])
        response.raise_for_status()
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["mask_png"])))) > 127
        union = np.logical_or(mask, sample.mask).sum()
        scores.append(np.logical_and(mask, sample.mask).sum() / union if union else 1.0)
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("demo/model_repository/dinoserve-demo"))
    parser.add_argument("--checkpoint", type=Path, default=Path("demo/dinoserve-demo.pth"),
                        help="the bundle's checkpoint: its architecture is the random-init baseline's")
    parser.add_argument("--backgrounds", type=lambda text: parse_backgrounds(text.split("+")), default="test",
                        help="background kinds or groups of the held-out images (default: test)")
    parser.add_argument("--train", type=int, nargs=2, default=(1000, 400), metavar=("SEEN", "UNSEEN"),
                        help="collection images (seed 201) for the trained and the unseen shapes")
    parser.add_argument("--val", type=int, nargs=2, default=(500, 200), metavar=("SEEN", "UNSEEN"),
                        help="images classified (seed 202)")
    parser.add_argument("--masks", type=int, default=200, help="images segmented (seed 203, 160x120)")
    parser.add_argument("--image-size", type=int, default=80, help="side of the k-NN images")
    args = parser.parse_args()

    card = ModelCard.load(args.bundle)
    backgrounds = args.backgrounds
    seen = (Split(args.train[0], 201, args.image_size).samples(backgrounds, CLASSES),
            Split(args.val[0], 202, args.image_size).samples(backgrounds, CLASSES))
    unseen = (Split(args.train[1], 201, args.image_size).samples(backgrounds, UNSEEN_CLASSES),
              Split(args.val[1], 202, args.image_size).samples(backgrounds, UNSEEN_CLASSES))
    masks = Split(args.masks, 203, (160, 120)).samples(backgrounds, CLASSES)
    print(f"{card.arch}/{card.patch_size}, card crop {card.preprocess.crop} (resize {card.preprocess.resize}), "
          f"segmentation size {card.segmentation_size}; held-out backgrounds {'+'.join(backgrounds)}; k-NN: "
          f"{args.train[0]}/{args.val[0]} images of the trained shapes, {args.train[1]}/{args.val[1]} of "
          f"{' and '.join(UNSEEN_CLASSES)}, {args.image_size} px; masks: {args.masks} images 160x120")
    print("| model | k-NN top-1, trained shapes (%) | k-NN top-1, unseen shapes (%) | default mask IoU |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {"random init": random_init_bundle(args.checkpoint, card, Path(tmp) / "repository"),
                   f"trained ({args.bundle.name})": args.bundle}
        for name, bundle in bundles.items():
            data_dir = Path(tmp) / f"{bundle.name}-data"  # collections of its own
            server, url = start_server(bundle, Path(tmp) / f"{bundle.name}.log", {"DINOSERVE_DATA_DIR": str(data_dir)})
            try:
                with httpx.Client(base_url=url, timeout=300) as api:
                    top1_seen = knn_top1(api, "seen", *seen)
                    top1_unseen = knn_top1(api, "unseen", *unseen)
                    iou = mask_iou(api, masks)
            finally:
                server.terminate()
                server.wait(timeout=60)
            print(f"| {name} | {top1_seen:.1f} | {top1_unseen:.1f} | {iou:.3f} |", flush=True)


if __name__ == "__main__":
    main()
