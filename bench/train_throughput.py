"""Training-step throughput of DINO and iBOT (images/s), the trainer's real step on synthetic tensors.

    .venv/bin/python bench/train_throughput.py                      # ViT-S/16, 2x224 + 8x96 crops, CPU
    .venv/bin/python bench/train_throughput.py --arch vit_base --batch-size 64   # on a GPU
    .venv/bin/python bench/train_throughput.py --config demo/train.toml           # a training config's recipe

Each variant builds a ``Trainer`` (the code ``dinoserve train`` runs) and times ``Trainer._step``: teacher
and student forward, loss, backward, clipping, optimizer step and EMA update, on crops already in
memory (data loading is not measured). The median of ``--repeats`` timed steps after ``--warmup`` steps
is reported, with its ratio to the plain fp32 eager step measured in the same run. On a GPU the variants
are: fp32 eager, bf16 autocast, bf16 + channels-last, bf16 + fused AdamW, bf16 + fused AdamW +
``torch.compile``; on a CPU fp32 and bf16 autocast (``--compile`` adds ``torch.compile``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from training.config import TrainConfig
from training.trainer import Trainer, param_groups


def _crops(cfg: TrainConfig, device: torch.device, channels_last: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.local_crops_number
    crops = [torch.randn(cfg.batch_size, 3, s, s, generator=g).to(device) for s in sizes]
    if channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    grid = cfg.global_size // cfg.patch_size
    if cfg.method == "ibot":  # about iBOT's average masking ratio, scattered (the cost is the same)
        masks = torch.rand(cfg.batch_size, 2, grid, grid, generator=g) < 0.15
    else:
        masks = torch.empty(cfg.batch_size, 0, dtype=torch.bool)
    return crops, masks.to(device)


def measure(cfg: TrainConfig, variant: dict, warmup: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_dict({**cfg.__dict__, "output": out, "precision": variant["precision"],
                                     "tensorboard": False})
        trainer = Trainer(cfg, progress=False)
        device = trainer.device
        trainer.optimizer = torch.optim.AdamW(param_groups(trainer.student),
                                              fused=variant.get("fused", False) and device.type == "cuda")
        if variant.get("channels_last"):
            trainer.student.to(memory_format=torch.channels_last)
            trainer.teacher.to(memory_format=torch.channels_last)
        if variant.get("compile"):
            trainer.student_ddp = torch.compile(trainer.student)
            trainer.teacher = torch.compile(trainer.teacher)
        crops, masks = _crops(cfg, device, variant.get("channels_last", False))
        times = []
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            trainer.step(crops, masks, epoch=1, it=i % trainer.iters)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - started)
        return cfg.batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8 on CPU)")
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["dino", "ibot"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile on a CPU")
    parser.add_argument("--config", help="measure this training config's recipe (its method, backbone, crops, "
                        "head and batch size) instead of the options above")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        variants = [
            {"name": "fp32 eager", "precision": "fp32"},
            {"name": "bf16 autocast", "precision": "bf16"},
            {"name": "bf16 + channels-last", "precision": "bf16", "channels_last": True},
            {"name": "bf16 + fused AdamW", "precision": "bf16", "fused": True},
            {"name": "bf16 + fused AdamW + compile", "precision": "bf16", "fused": True, "compile": True},
        ]
        device = torch.cuda.get_device_name()
    else:
        variants = [{"name": "fp32 eager", "precision": "fp32"}, {"name": "bf16 autocast", "precision": "bf16"}]
        if args.compile:
            variants.append({"name": "fp32 + compile", "precision": "fp32", "compile": True})
        device = f"CPU, {torch.get_num_threads()} threads"

    if args.config:
        recipe = TrainConfig.from_file(args.config)
        configs = [TrainConfig.from_dict({**recipe.__dict__, "data": f"synthetic:{recipe.batch_size}:32:0",
                                          "num_workers": 0, "epochs": 2, "warmup_epochs": 0, "knn_every": 0})]
    else:
        configs = [TrainConfig(method=method, arch=args.arch, patch_size=args.patch_size, batch_size=args.batch_size,
                               local_crops_number=args.local_crops, data=f"synthetic:{args.batch_size}:32:0",
                               num_workers=0, epochs=2, warmup_epochs=0, out_dim=65536 if method == "dino" else 8192,
                               patch_out_dim=8192, shared_head=method == "ibot")
                   for method in args.methods]
    first = configs[0]
    print(f"{first.arch}/{first.patch_size} ({first.stem} stem), batch {first.batch_size}, 2x{first.global_size} + "
          f"{first.local_crops_number}x{first.local_size} crops, {device}; "
          f"median of {args.repeats} steps after {args.warmup} warm-up steps")
    print(f"{'method':<6}  {'variant':<30}  {'images/s':>9}  {'vs fp32 eager':>13}")
    for cfg in configs:
        method = cfg.method
        baseline = None
        for variant in variants:
            rate = measure(cfg, variant, args.warmup, args.repeats)
            baseline = baseline or rate
            print(f"{method:<6}  {variant['name']:<30}  {rate:9.2f}  {rate / baseline:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
