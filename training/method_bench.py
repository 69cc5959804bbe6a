"""``dinoserve bench-methods``: every method trained for the same compute budget on the same data, then
compared by weighted k-NN top-1 and by the IoU of its segmentation masks with the synthetic objects' masks.

The budget is CPU time of the training process (data loading runs in it: ``num_workers`` 0), which other
jobs on a shared machine do not eat into, unlike wall-clock time; with one torch thread on an otherwise
idle machine the two are equal. For each method a few steps are timed first (``Trainer.time_steps``); the
run then gets the whole epochs nearest the budget, so every method runs a complete schedule (warm-ups
scaled to 10 % and 30 % of the epochs, as the papers' 10 / 100 and 30 / 100).

The served backbone of each run (DINO and iBOT: the teacher; MoCo v3 and BYOL: the online encoder, as
their papers evaluate) is scored with DINO's weighted k-NN (k = 20, T = 0.07; ``evaluate.py``) on a
labelled held-out split, and with the mask IoU of ``mask_quality.py`` on held-out synthetic images: the
attention rule ``/v1/segment`` uses by default (mean over heads, DINO's keep-60%-of-mass) and TokenCut on
the patch tokens. The same architecture at random initialisation is the baseline. One table is printed
and written to a Markdown file with the date, the machine and the command.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import torch

from core.knn import DEFAULT_K, DEFAULT_TEMPERATURE

from .config import METHODS, TrainConfig
from .data import make_sample, open_dataset
from .evaluate import class_count, extract_features, knn_classifier, random_backbone
from .export import build_model, load_backbone
from .mask_quality import attention_model, scores
from .models import BackboneSpec
from .trainer import Trainer, backbone_filename, train

log = logging.getLogger(__name__)

# What fits a CPU minute per method: an 8-pixel-patch ViT-nano on 64-pixel crops (an 8 x 8 patch grid, so
# the attention masks have some resolution), heads scaled down from the papers' sizes with the data.
CPU_DEFAULTS = dict(arch="vit_nano", patch_size=8, img_size=64, global_size=64, local_size=32,
                    local_crops_number=2, batch_size=32, out_dim=1024, patch_out_dim=1024, hidden_dim=512,
                    bottleneck_dim=128, swav_prototypes=64, drop_path_rate=0.0, num_workers=0,
                    tensorboard=False)
TIMED_STEPS = 10
KEEP_MASS = 0.6


@dataclass(frozen=True)
class MethodResult:
    method: str
    epochs: int
    steps: int
    cpu_minutes: float
    wall_minutes: float
    knn_top1: float
    mask_iou: float  # the attention rule ("mean")
    tokencut_iou: float  # TokenCut on the patch tokens


@dataclass(frozen=True)
class BenchSetup:
    data: str
    knn_train: str
    knn_val: str
    budget_minutes: float
    eval_size: int
    mask_images: int
    mask_seed: int
    mask_image_size: tuple[int, int]
    mask_size: int


def _evaluate(vit: torch.nn.Module, setup: BenchSetup, patch: int, train_set, val_set,
              num_classes: int) -> tuple[float, float, float]:
    """k-NN top-1 in percent, mean mask IoU of the attention rule and of TokenCut, of a backbone."""
    train_feats = extract_features(vit, train_set, progress=False, size=setup.eval_size)
    val_feats = extract_features(vit, val_set, progress=False, size=setup.eval_size)
    top1, _ = knn_classifier(*train_feats, *val_feats, min(DEFAULT_K, len(train_set)), DEFAULT_TEMPERATURE, num_classes)
    ious = scores(attention_model(vit), range(setup.mask_images), setup.mask_seed, setup.mask_image_size,
                  setup.mask_size, KEEP_MASS, patch, "masks", progress=False)
    return top1, float(ious["mean"].mean()), float(ious["tokencut"].mean())


def plan_run(method: str, options: dict, setup: BenchSetup, output: Path) -> TrainConfig:
    """Time a few steps of ``method``, then the config of a run of the whole epochs nearest the budget."""
    cfg = TrainConfig.build(values={**options, "method": method, "data": setup.data, "epochs": 1})
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as scratch:
        trainer = Trainer(replace(cfg, output=scratch), progress=False)
        seconds, iters = trainer.time_steps(TIMED_STEPS, clock=time.process_time), trainer.iters
        del trainer
    epochs = max(1, round(setup.budget_minutes * 60 / (seconds * iters)))
    log.info("%s: %.3f CPU s per step, %d steps per epoch: %d epochs in %g CPU min", method, seconds, iters,
             epochs, setup.budget_minutes)
    return TrainConfig.build(values={
        **options, "method": method, "data": setup.data, "epochs": epochs, "output": str(output),
        "warmup_epochs": epochs // 10, "warmup_teacher_temp_epochs": max(epochs * 3 // 10, 1),
        "freeze_prototypes_iters": iters,  # SwAV's reference freezes them for about its first epoch
    })


def bench_methods(setup: BenchSetup, methods: tuple[str, ...] = METHODS, options: dict | None = None,
                  output: Path = Path("runs/bench-methods"), progress: bool = True
                  ) -> tuple[list[MethodResult], tuple[float, float, float], TrainConfig]:
    """Train and score every method in ``output/<method>`` (replacing older runs there); returns the
    results, the random-initialisation baseline (k-NN top-1, mask IoUs) and the last run's config."""
    options = {**CPU_DEFAULTS, **(options or {})}
    train_set, val_set = open_dataset(setup.knn_train), open_dataset(setup.knn_val)
    num_classes = class_count(train_set, val_set)
    results, cfg = [], None
    for method in methods:
        run_dir = Path(output) / method
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
        cfg = plan_run(method, options, setup, run_dir)
        wall, cpu = time.perf_counter(), time.process_time()
        train(cfg, progress=progress)
        wall, cpu = (time.perf_counter() - wall) / 60, (time.process_time() - cpu) / 60
        spec, _, weights = load_backbone(run_dir / backbone_filename(method))
        top1, iou, tokencut = _evaluate(build_model(spec, weights), setup, spec.patch_size, train_set, val_set,
                                        num_classes)
        with open(run_dir / "metrics.csv") as f:
            steps = sum(1 for _ in f) - 1
        results.append(MethodResult(method, cfg.epochs, steps, cpu, wall, top1, iou, tokencut))
        log.info("%s: k-NN top-1 %.1f %%, mask IoU %.3f (TokenCut %.3f)", method, top1, iou, tokencut)
    spec = BackboneSpec.from_arch(cfg.arch, cfg.patch_size, cfg.img_size, stem=cfg.stem)
    baseline = _evaluate(random_backbone(spec, cfg.seed), setup, spec.patch_size, train_set, val_set, num_classes)
    return results, baseline, cfg


def table(results: list[MethodResult], baseline: tuple[float, float, float]) -> str:
    """The comparison as a Markdown table, the random-initialisation baseline last."""
    lines = ["| method | epochs | steps | training, CPU (min) | training, wall-clock (min) | k-NN top-1 (%) "
             "| mask IoU, attention | mask IoU, TokenCut |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.method} | {r.epochs} | {r.steps} | {r.cpu_minutes:.2f} | {r.wall_minutes:.2f} | "
              f"{r.knn_top1:.1f} | {r.mask_iou:.3f} | {r.tokencut_iou:.3f} |" for r in results]
    lines.append(f"| random init | – | – | – | – | {baseline[0]:.1f} | {baseline[1]:.3f} | {baseline[2]:.3f} |")
    return "\n".join(lines)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    virtual = cpuinfo.is_file() and " hypervisor" in cpuinfo.read_text()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()}-core {platform.system()} {platform.machine()} {'VM' if virtual else 'machine'}, "
            f"{gpu}, torch {torch.__version__} with {torch.get_num_threads()} thread(s)")


def report(results: list[MethodResult], baseline: tuple[float, float, float], setup: BenchSetup, cfg: TrainConfig,
           command: str, load_average: float) -> str:
    """docs/methods.md: the setup, the table and what the figures say."""
    classes = len(open_dataset(setup.knn_val).classes)
    chance = 100 / classes
    whole = sum(make_sample(i, size=setup.mask_image_size, seed=setup.mask_seed).mask.mean()
                for i in range(setup.mask_images)) / setup.mask_images
    best = max(results, key=lambda r: r.knn_top1)
    floor = max(chance, baseline[0])
    if best.knn_top1 - floor < 10:
        reading = (f"At this budget the figures are near chance: the best k-NN top-1 ({best.method}, "
                   f"{best.knn_top1:.1f} %) is within 10 points of chance ({chance:.1f} %) or of the random "
                   f"initialisation ({baseline[0]:.1f} %), and differences between methods are of the size of "
                   "run-to-run noise. The table shows that every method trains, checkpoints and is scored "
                   "through the same pipeline; it does not rank them. The papers train for hundreds of "
                   "epochs of ImageNet on GPUs, and their ranking needs budgets of that order.")
    else:
        reading = (f"The best k-NN top-1 ({best.method}, {best.knn_top1:.1f} %) is {best.knn_top1 - floor:.1f} "
                   f"points above chance ({chance:.1f} %) and the random initialisation ({baseline[0]:.1f} %). "
                   "One run per method on a small budget: differences of a few points are within run-to-run "
                   "noise.")
    off = [r.method for r in results if abs(r.cpu_minutes - setup.budget_minutes) > 0.2 * setup.budget_minutes]
    if off:
        reading += (f" The CPU time of {', '.join(off)} is more than 20 % off the budget: each ran the whole "
                    "epochs planned from a few timed steps, and the rate changed during the run.")
    locals_note = (f"DINO, iBOT and SwAV also see {cfg.local_crops_number} local crops of {cfg.local_size} px; "
                   "MoCo v3, SimCLR, BYOL and SimSiam the two global views only")
    lines = [
        "# The self-supervised methods compared",
        "",
        "DINO and iBOT next to the methods they grew out of (MoCo v3, SimCLR, BYOL, SimSiam, SwAV), each trained "
        "by `dinoserve train --method ...` for the same compute budget on the same data and scored on the same "
        "held-out images. Written by `dinoserve bench-methods` (`training/method_bench.py`); run the command "
        "again to refresh it.",
        "",
        f"- **Run**: {date.today().isoformat()} on a {machine()}; load average {load_average:.1f} at the start.",
        f"- **Command**: `{command}`",
        f"- **Training**: {setup.budget_minutes:g} min of CPU time of the training process per method (wall-clock "
        "on a shared machine depends on the other jobs; both are in the table) on "
        f"`{setup.data}`: a "
        f"{cfg.arch}/{cfg.patch_size} ViT on {cfg.global_size} px global crops ({locals_note}), batch "
        f"{cfg.batch_size}, AdamW at lr {cfg.lr} per 256 images, the trainer's shared defaults otherwise. A few "
        "steps are timed first and each method gets the whole epochs nearest its budget, with its full schedule.",
        f"- **k-NN top-1**: DINO's weighted k-NN (k = {DEFAULT_K}, T = {DEFAULT_TEMPERATURE}) of the served backbone's CLS "
        f"features ({setup.eval_size} px centre crops) on `{setup.knn_val}` against `{setup.knn_train}`: "
        f"{classes} classes, chance {chance:.1f} %.",
        f"- **Mask IoU**: mean IoU with the exact object masks of the `/v1/segment` masks at a shorter side of "
        f"{setup.mask_size} px: the last block's attention (the endpoint's default rule: mean over heads, keep "
        f"{KEEP_MASS:.0%} of the mass) and TokenCut (a normalised cut of the patch tokens' similarity graph), on "
        f"{setup.mask_images} held-out synthetic images (seed {setup.mask_seed}, "
        f"{setup.mask_image_size[0]}x{setup.mask_image_size[1]}); the whole image as the mask scores {whole:.3f}.",
        "",
        table(results, baseline),
        "",
        reading,
    ]
    return "\n".join(lines) + "\n"
