"""Learnability check: can a model learn the synthetic shapes *with labels* on this machine's budget?

Supervised cross-entropy training on ``training.data.make_sample`` images (6 classes, chance 16.7 %), for a
small CNN, for the project's ViTs and for ViTs with a convolutional stem, from the same images, optimiser and
schedule. It bounds what a
self-supervised run of the same size can reach: a backbone that cannot learn the classes from labels in N
steps will not learn them from DINO's self-distillation in N steps either.

- ``cnn``: 4 conv layers (32/64/128/128 channels, 3x3, BatchNorm + ReLU), 2x2 max-pool between them, global
  max pool, linear head; ``cnn-avg``: the same with a global *mean* pool, which is what a ViT's CLS token
  computes at initialisation (uniform attention over the tokens);
- ``ARCH/PATCH`` (``vit_micro/8``, ``vit_nano/4``, ...): ``training.models`` backbone at ``--size``, linear
  head on its output (the final-norm CLS token);
- ``ARCH/PATCH+conv``: the same ViT with its patch projection (one PATCH x PATCH convolution of stride PATCH)
  replaced by a convolutional stem of the same stride, as Xiao et al., *Early Convolutions Help Transformers
  See Better* (NeurIPS 2021): log2(PATCH) 3x3 convolutions of stride 2 (channels doubling up to the
  embedding width / 2, BatchNorm + ReLU) and a 1x1 projection to the embedding width. It is the trainer's
  ``--stem conv`` (``training.models.conv_stem``; PATCH a power of two, at least 4).
- ``ARCH/PATCH+edges``: that stem fed a fixed, colour-blind edge map of the image instead of its colours, the
  trainer's ``--stem edges`` (``training.models.EdgeMap``).

Training images are samples ``0..N-1`` of seed 5 on ``--backgrounds`` (default ``classic``, the four kinds
the figures in docs/training.md were measured on; ``train``: those and the ``photo`` pictures), validation
images samples ``0..M-1`` of seed 202 on ``--val-backgrounds`` (default: the training ones; ``test``: kinds
and pictures no training image has), normalised with the ImageNet mean and std; no augmentation. AdamW
(weight decay 0.05) with a linear warm-up over ``--warmup`` steps, then a constant learning rate; batches
drawn with replacement from a seeded generator. Every ``--eval-every`` steps one row: the step, the
training loss (mean since the last row), the validation top-1, and the elapsed wall and process CPU seconds
of the training (evaluation included; data generation not).

    python bench/learnability.py
    python bench/learnability.py --models cnn vit_micro/8 vit_nano/4 --steps 600 --threads 2
    python bench/learnability.py --models vit_micro/8 vit_micro/8+conv --backgrounds train --val-backgrounds test
    python bench/learnability.py --models cnn cnn-avg --backgrounds train --val-backgrounds test --steps 300
    python bench/learnability.py --models vit_micro/8+conv vit_micro/8+edges --backgrounds train --val-backgrounds test --steps 300
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.synthetic import CLASSES, make_sample, parse_backgrounds
from training.models import BackboneSpec, build_backbone

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def images(count: int, size: int, seed: int, backgrounds: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for index in range(count):
        sample = make_sample(index, size, seed, backgrounds)
        xs.append((torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float() / 255 - MEAN) / STD)
        ys.append(sample.label)
    return torch.stack(xs), torch.tensor(ys)


def build(name: str, size: int) -> nn.Module:
    if name in ("cnn", "cnn-avg"):
        # cnn-avg: the same CNN pooling its last feature map by its mean instead of its maximum, as a ViT's
        # CLS token does at initialisation (uniform attention).
        last_pool = nn.AdaptiveAvgPool2d(1) if name == "cnn-avg" else nn.AdaptiveMaxPool2d(1)
        layers, cin = [], 3
        for i, cout in enumerate((32, 64, 128, 128)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            layers.append(nn.MaxPool2d(2) if i < 3 else last_pool)
            cin = cout
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin, len(CLASSES)))
    name, plus, stem = name.partition("+")
    arch, _, patch = name.partition("/")
    if plus and stem not in ("conv", "edges"):
        raise ValueError(f"unknown stem {stem!r}; ARCH/PATCH+conv is the convolutional one, +edges the edge map's")
    # The trainer's backbone option (``--stem conv`` / ``--stem edges``, training.models).
    spec = BackboneSpec.from_arch(arch, int(patch or 16), size, stem=stem if plus else "patch")
    return nn.Sequential(build_backbone(spec), nn.Linear(spec.embed_dim, len(CLASSES)))


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(256), y.split(256)))
    model.train()
    return 100 * hits / len(y)


def train(name: str, data: tuple, args: argparse.Namespace) -> tuple:
    (xtr, ytr), (xval, yval) = data
    torch.manual_seed(args.seed)
    model = build(name, args.size)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"\n## {name}: {params:,} parameters\n")
    print("| step | train loss | val top-1 % | wall s | CPU s |\n|---:|---:|---:|---:|---:|")
    print(f"| 0 | — | {top1(model, xval, yval):.1f} | 0 | 0 |", flush=True)
    wall0, cpu0, losses = time.perf_counter(), time.process_time(), []
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
        idx = torch.randint(len(ytr), (args.batch,), generator=gen)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            acc = top1(model, xval, yval)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            print(f"| {step} | {np.mean(losses):.3f} | {acc:.1f} | {wall:.0f} | {cpu:.0f} |", flush=True)
            losses = []
    return name, params, args.steps, wall, cpu, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "vit_micro/8"],
                        help="cnn, cnn-avg and/or ARCH/PATCH[+conv|+edges]")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch sampling")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--backgrounds", default="classic", help="background kinds or groups of the training "
                        "images, joined by + (default: classic; train adds the photo pictures)")
    parser.add_argument("--val-backgrounds", help="of the validation images (default: --backgrounds; test: none "
                        "that the training images have)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_kinds = parse_backgrounds(args.backgrounds.split("+"))
    val_kinds = parse_backgrounds((args.val_backgrounds or args.backgrounds).split("+"))
    data = images(args.train_images, args.size, 5, train_kinds), images(args.val_images, args.size, 202, val_kinds)
    print(f"# learnability: supervised, {args.size} px, {args.train_images} train ({'+'.join(train_kinds)}) / "
          f"{args.val_images} val images ({'+'.join(val_kinds)}), batch {args.batch}, AdamW lr {args.lr:g}, "
          f"{args.threads} threads; {date.today()}")
    rows = [train(name, data, args) for name in args.models]
    print("\n## summary\n\n| model | params | steps | wall s | CPU s | val top-1 % | chance % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, params, steps, wall, cpu, acc in rows:
        print(f"| {name} | {params:,} | {steps} | {wall:.0f} | {cpu:.0f} | {acc:.1f} | {100 / len(CLASSES):.1f} |")


if __name__ == "__main__":
    main()
