"""The DINO training loop: one visible step (teacher, student, loss, clip, step, EMA).

Follows ``train_one_epoch`` of the official ``main_dino.py``; schedules are per iteration, the teacher
is an EMA of the student and never receives gradients.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .augment import MultiCropAugmentation, MultiCropConfig
from .config import TrainConfig
from .checkpoint import BACKBONE_FORMAT, FORMAT_VERSION, FULL_FORMAT, atomic_save, strip_prefix
from .data import open_dataset
from .losses import DINOLoss
from .models import BackboneSpec, DINOHead, MultiCropWrapper, build_backbone
from .schedules import cosine_scheduler

log = logging.getLogger(__name__)


def _param_groups(model: nn.Module) -> list[dict]:
    """No weight decay on biases and norm parameters (official ``get_params_groups``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> None:
    """Clip each parameter's gradient norm to ``clip`` separately (official ``utils.clip_gradients``)."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            scale = clip / (norm + 1e-6)
            if scale < 1:
                p.grad.data.mul_(scale)


def cancel_last_layer_gradients(model: MultiCropWrapper, epoch: int, freeze_last_layer: int) -> None:
    if epoch < freeze_last_layer:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None


class NonFiniteLossError(RuntimeError):
    pass


def build_models(cfg: TrainConfig) -> tuple[BackboneSpec, MultiCropWrapper, MultiCropWrapper]:
    spec = BackboneSpec.from_arch(cfg.arch, cfg.patch_size, cfg.img_size, cfg.drop_path_rate)
    student = MultiCropWrapper(
        build_backbone(spec),
        DINOHead(spec.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                 norm_last_layer=cfg.norm_last_layer),
    )
    teacher = MultiCropWrapper(
        build_backbone(BackboneSpec(**{**spec.to_dict(), "drop_path_rate": 0.0})),
        DINOHead(spec.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim),
    )
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return spec, student, teacher


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train, writing ``checkpoint.pth`` every epoch and ``teacher_backbone.pth`` at the end.

    Resumes from ``<output>/checkpoint.pth`` when it exists. Returns the output directory.
    """
    if cfg.method != "dino":
        raise ValueError(f"method {cfg.method!r} is not available; this trainer implements 'dino'")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    augmentation = MultiCropAugmentation(MultiCropConfig(
        cfg.global_size, cfg.local_size, cfg.global_scale, cfg.local_scale, cfg.local_crops_number
    ))
    dataset = open_dataset(cfg.data, transform=augmentation)
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"dataset has {len(dataset)} images, fewer than one batch of {cfg.batch_size}")
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.num_workers > 0,
    )

    spec, student, teacher = build_models(cfg)
    loss_fn = DINOLoss(cfg.out_dim, augmentation.ncrops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                       min(cfg.warmup_teacher_temp_epochs, cfg.epochs), cfg.epochs, cfg.student_temp,
                       cfg.center_momentum)
    optimizer = torch.optim.AdamW(_param_groups(student))

    iters = len(loader)
    lr_schedule = cosine_scheduler(cfg.lr * cfg.batch_size / 256.0, cfg.min_lr, cfg.epochs, iters,
                                  min(cfg.warmup_epochs, cfg.epochs))
    wd_schedule = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, iters)
    momentum_schedule = cosine_scheduler(cfg.momentum_teacher, 1.0, cfg.epochs, iters)

    start_epoch = 0
    ckpt_path = out / "checkpoint.pth"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["dino_loss"])
        start_epoch = state["epoch"]
        log.info("resuming from %s at epoch %d", ckpt_path, start_epoch)

    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    history = out / "log.jsonl"
    for epoch in range(start_epoch, cfg.epochs):
        student.train()
        bar = tqdm(total=iters * cfg.batch_size, unit="img", desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=True)
        losses, started = [], time.perf_counter()
        for it, (crops, _) in enumerate(loader):
            step = epoch * iters + it
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(lr_schedule[step])
                if i == 0:
                    group["weight_decay"] = float(wd_schedule[step])

            with torch.no_grad():
                teacher_out = teacher(crops[:2])
            student_out = student(crops)
            loss = loss_fn(student_out, teacher_out, epoch)
            if not math.isfinite(loss.item()):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at epoch {epoch}, iteration {it}: training diverged; "
                    "lower the learning rate or the teacher temperature, or raise clip_grad protection"
                )

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                clip_gradients(student, cfg.clip_grad)
            cancel_last_layer_gradients(student, epoch, cfg.freeze_last_layer)
            optimizer.step()

            with torch.no_grad():  # EMA teacher
                m = float(momentum_schedule[step])
                for ps, pt in zip(student.parameters(), teacher.parameters()):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)

            losses.append(loss.item())
            bar.update(cfg.batch_size)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_schedule[step]:.2e}")
        bar.close()

        elapsed = time.perf_counter() - started
        record = {"epoch": epoch + 1, "loss": sum(losses) / len(losses),
                  "images_per_s": iters * cfg.batch_size / elapsed}
        with open(history, "a") as f:
            f.write(json.dumps(record) + "\n")
        atomic_save({
            "format": FULL_FORMAT, "version": FORMAT_VERSION, "method": cfg.method,
            "backbone": spec.to_dict(), "config": asdict(cfg), "epoch": epoch + 1,
            "student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(), "dino_loss": loss_fn.state_dict(),
        }, ckpt_path)

    atomic_save({
        "format": BACKBONE_FORMAT, "version": FORMAT_VERSION, "method": cfg.method,
        "backbone": {**spec.to_dict(), "drop_path_rate": 0.0},
        "state_dict": strip_prefix(teacher.state_dict(), "backbone."),
    }, out / "teacher_backbone.pth")
    return out
