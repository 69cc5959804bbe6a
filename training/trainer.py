"""The training loop: one visible step (teacher, student, loss, clip, step, EMA), the official one.

``Trainer.step`` is ``train_one_epoch``'s loop body of the official ``main_dino.py`` and ``main_ibot.py``,
operation for operation: learning rate and weight decay set from per-iteration schedules at
``epoch * iters + it``, teacher then student forward and the loss (which updates its centres), zero-grad,
backward, per-parameter gradient clipping, the frozen last layer's gradients dropped, the optimizer step,
then the EMA ``t = t · m + (1 - m) · s``. With ``--precision fp16`` the GradScaler calls come in the
official order (scale, backward, unscale only when clipping, clip, cancel, step, update).
``tests/test_trainer_parity.py`` checks that against a run of the official code.

The method is an ``Objective`` (``methods.py``): DINO, iBOT, MoCo v3, SimCLR, BYOL, SimSiam and SwAV build
their networks and compute their loss there; this loop has no method of its own. Runs in one process or
under ``torchrun`` (DDP; every rank computes the same EMA, rank 0 writes files). Checkpoints use the
official full-checkpoint layout (``student`` with ``module.`` prefixes, ``teacher``, ``optimizer``,
``dino_loss`` / ``ibot_loss``, ``fp16_scaler``) with our own keys beside it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.knn import DEFAULT_TEMPERATURE
from core.synthetic import ShapeCurriculum

from . import distributed
from .augment import MultiCropAugmentation, MultiCropConfig
from .checkpoint import FORMAT_VERSION, FULL_FORMAT, atomic_save, backbone_file, strip_prefix
from .config import TrainConfig
from .data import open_dataset
from .masking import BlockMaskGenerator
from .methods import OBJECTIVES
from .models import BackboneSpec
from .schedules import cosine_scheduler
from .views import EpochShardSampler, TrainingViews

log = logging.getLogger(__name__)

DDP_PREFIX = "module."  # the official student is always DistributedDataParallel-wrapped


def loss_state_key(method: str) -> str:
    """The loss entry of a full checkpoint: ``dino_loss`` / ``ibot_loss`` as the official files."""
    return f"{method}_loss"


def backbone_filename(method: str) -> str:
    """The served backbone a run writes: DINO and iBOT serve their teacher; the other methods the network
    they train (MoCo v3 and BYOL: the online encoder, which their papers evaluate)."""
    return "teacher_backbone.pth" if OBJECTIVES[method].serves_teacher else "backbone.pth"


def param_groups(model: nn.Module) -> list[dict]:
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


class NonFiniteLossError(RuntimeError):
    pass


def build_models(cfg: TrainConfig) -> tuple[BackboneSpec, nn.Module, nn.Module | None]:
    """The method's student and teacher (or momentum encoder; None without one), equal initial weights."""
    spec = BackboneSpec.from_arch(cfg.arch, cfg.patch_size, cfg.img_size, cfg.drop_path_rate, cfg.stem)
    student, teacher = OBJECTIVES[cfg.method](cfg).build_networks(spec)
    return spec, student, teacher


def cpu_has_bf16_units(capabilities: dict) -> bool | None:
    """Whether an x86 CPU (``torch.cpu.get_capabilities()``) multiplies bf16 in hardware (AVX-512 BF16 or
    AMX); None for other architectures, where the capabilities do not say."""
    if capabilities.get("architecture") != "x86_64":
        return None
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 with a grad scaler on GPUs, as the official recipes (``--use_fp16 true``); fp32 on
    CPUs. bf16 is an explicit choice (docs/training.md, "Fidelity"); on an x86 CPU without bf16 units it is
    emulated, many times slower than fp32 (docs/training.md, "bf16 on a CPU"), and a warning says so."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device (its grad scaler is for GPUs); use fp32 or bf16 on CPU")
    if precision == "bf16" and device.type == "cpu" and cpu_has_bf16_units(torch.cpu.get_capabilities()) is False:
        log.warning("precision bf16 on a CPU without bf16 units (no AVX-512 BF16 or AMX): autocast emulates "
                    "it, many times slower than fp32 here; precision fp32 (or auto) trains faster")
    return precision


def _with_prefix(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _without_prefix(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items()}


class MetricsWriter:
    """Per-step metrics to ``metrics.csv`` (and TensorBoard when enabled and installed)."""

    def __init__(self, out: Path, columns: list[str], start_epoch: int, tensorboard: bool):
        self.path = out / "metrics.csv"
        self.columns = columns
        kept = []
        if self.path.exists():  # a resumed run: drop rows of epochs it will redo
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["epoch"]) < start_epoch]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=columns)
        self.writer.writeheader()
        self.writer.writerows({k: row.get(k, "") for k in columns} for row in kept)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.csv only")
            else:
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=None)

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(name, value, step)

    def flush(self) -> None:
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """Everything one training run needs; :meth:`fit` runs the remaining epochs, :meth:`step` one
    official iteration."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.rt = distributed.setup(cfg.device)
        self.device = self.rt.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.out = Path(cfg.output)
        if self.rt.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.objective = OBJECTIVES[cfg.method](cfg)

        local_crops = cfg.local_crops_number if self.objective.multi_crop else 0
        augmentation = MultiCropAugmentation(MultiCropConfig(
            cfg.global_size, cfg.local_size, cfg.global_scale, cfg.local_scale, local_crops,
            cfg.color_jitter, cfg.grayscale_p))
        self.ncrops = augmentation.ncrops
        dataset = open_dataset(cfg.data)
        if cfg.curriculum_epochs:
            dataset = ShapeCurriculum(dataset, cfg.curriculum_epochs)
        per_step = cfg.batch_size * self.rt.world_size
        if len(dataset) < per_step:
            raise ValueError(f"dataset has {len(dataset)} images, fewer than one step of {per_step} "
                             f"({cfg.batch_size} per process x {self.rt.world_size} processes)")
        masks = None
        if self.objective.uses_masks:
            masks = BlockMaskGenerator(cfg.pred_ratio, cfg.pred_ratio_var, cfg.pred_aspect)
        views = TrainingViews(dataset, augmentation, cfg.seed, masks, cfg.global_size // cfg.patch_size,
                              cfg.pred_start_epoch)
        self.sampler = EpochShardSampler(len(dataset), cfg.seed, self.rt.rank, self.rt.world_size)
        self.loader = DataLoader(views, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                 pin_memory=self.device.type == "cuda")

        self.spec = BackboneSpec.from_arch(cfg.arch, cfg.patch_size, cfg.img_size, cfg.drop_path_rate, cfg.stem)
        self.student, self.teacher = self.objective.build_networks(self.spec)
        has_bn = any(isinstance(m, nn.BatchNorm1d) for m in self.student.modules())
        if has_bn and self.rt.distributed and self.device.type == "cuda":
            # Batch statistics over the global batch, as the official code does (SyncBatchNorm is CUDA-only;
            # gloo workers on CPUs normalise with their own share of the batch).
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            if self.teacher is not None:
                self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        # The official teacher is DDP-wrapped (so its keys carry ``module.``) only when it has BatchNorm.
        self.teacher_prefix = DDP_PREFIX if has_bn else ""
        self.student.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device)
        # EMA pairs by name, in the student's order (official main_ibot.py: the parameters the two share;
        # a momentum encoder has no predictor, the iBOT teacher no mask token).
        teacher_params = dict(self.teacher.named_parameters()) if self.teacher is not None else {}
        self.ema_pairs = [(p, teacher_params[name]) for name, p in self.student.named_parameters()
                          if name in teacher_params]
        self.student_ddp = self.student
        if self.rt.distributed:
            self.student_ddp = DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.objective.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

        epochs = cfg.epochs
        self.iters = len(self.loader)
        self.lr_schedule = cosine_scheduler(cfg.lr * per_step / 256.0, cfg.min_lr, epochs, self.iters,
                                            min(cfg.warmup_epochs, epochs))
        self.wd_schedule = cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, epochs, self.iters)
        self.momentum_schedule = cosine_scheduler(cfg.momentum_teacher, 1.0, epochs, self.iters)
        self.start_epoch = self._resume()
        self._train_mode()

    # -- checkpoints -------------------------------------------------------------------------------

    def official_checkpoint(self) -> dict:
        """The run's state in the official full-checkpoint layout (``main_dino.py`` / ``main_ibot.py``):
        ``student`` (keys ``module.backbone.*`` / ``module.head.*``), ``teacher``, ``optimizer``,
        ``<method>_loss`` (``dino_loss``: the centre; ``ibot_loss``: both centres) and, with fp16,
        ``fp16_scaler``. The official scripts resume from it; our checkpoint files hold it."""
        state = {"student": _with_prefix(self.student.state_dict(), DDP_PREFIX),
                 "optimizer": self.optimizer.state_dict(),
                 loss_state_key(self.cfg.method): self.objective.loss_state()}
        if self.teacher is not None:
            state["teacher"] = _with_prefix(self.teacher.state_dict(), self.teacher_prefix)
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        return state

    def load_official_checkpoint(self, ckpt: dict) -> None:
        """Load a dict in the official full-checkpoint layout (see :meth:`official_checkpoint`; ``module.``
        prefixes optional) into the student, teacher, loss, optimizer and grad scaler; ``optimizer`` and
        ``fp16_scaler`` only when present."""
        self.student.load_state_dict(_without_prefix(ckpt["student"], DDP_PREFIX))
        if self.teacher is not None:
            self.teacher.load_state_dict(_without_prefix(ckpt["teacher"], DDP_PREFIX))
        self.objective.load_loss_state(ckpt[loss_state_key(self.cfg.method)])
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("fp16_scaler"):
            self.scaler.load_state_dict(ckpt["fp16_scaler"])

    def _resume(self) -> int:
        explicit = Path(self.cfg.resume) if self.cfg.resume else None
        path = explicit or self.out / "checkpoint.pth"
        if explicit is not None and not explicit.is_file():
            raise FileNotFoundError(f"--resume {explicit}: no such checkpoint")
        if not path.is_file():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != FULL_FORMAT:
            raise ValueError(f"{path} is not a dinoserve training checkpoint (format {state.get('format')!r})")
        if state["method"] != self.cfg.method or state["backbone"]["arch"] != self.spec.arch:
            raise ValueError(f"{path} is a {state['method']} run of {state['backbone']['arch']}; this run is "
                             f"{self.cfg.method} of {self.spec.arch}: use another --output or matching options")
        if state["backbone"].get("stem", "patch") != self.spec.stem:
            raise ValueError(f"{path} was trained with the {state['backbone'].get('stem', 'patch')} stem; this run "
                             f"has --stem {self.spec.stem}: use another --output or the same stem")
        self.load_official_checkpoint(state)
        log.info("resuming from %s after epoch %d", path, state["epoch"])
        return int(state["epoch"])

    def _served(self) -> nn.Module:
        """The network whose backbone is served and monitored: see :func:`backbone_filename`."""
        return self.teacher if self.objective.serves_teacher else self.student

    def _save(self, epochs_done: int) -> None:
        # Every rank computes the same EMA (without one, DDP keeps the students equal); record each
        # rank's fingerprint as proof. The weights, not BatchNorm's running statistics: on CPUs (gloo, no
        # SyncBatchNorm) each rank keeps its own, and training never uses them (batch statistics only).
        network, kind = (self.teacher, "teacher") if self.teacher is not None else (self.student, "student")
        fingerprints = distributed.gather_objects(distributed.fingerprint(network, buffers=False))
        if not self.rt.is_main:
            return
        cfg = self.cfg
        state = {
            **self.official_checkpoint(), "epoch": epochs_done,
            "format": FULL_FORMAT, "version": FORMAT_VERSION, "method": cfg.method,
            "backbone": self.spec.to_dict(), "config": asdict(cfg),
            "world_size": self.rt.world_size, f"{kind}_fingerprints": fingerprints,
        }
        atomic_save(state, self.out / "checkpoint.pth")
        if cfg.saveckp_freq and epochs_done % cfg.saveckp_freq == 0:
            atomic_save(state, self.out / f"checkpoint{epochs_done:04d}.pth")
        backbone = strip_prefix(self._served().state_dict(), "backbone.")
        backbone.pop("masked_embed", None)  # serving never masks
        atomic_save(backbone_file(self.spec.to_dict(), cfg.method, backbone), self.out / backbone_filename(cfg.method))

    # -- one step ----------------------------------------------------------------------------------

    def _train_mode(self) -> None:
        """Both networks in training mode, as the official code leaves them (the teacher too: its
        BatchNorm, with ``use_bn_in_head``, normalises with batch statistics)."""
        self.student.train()
        if self.teacher is not None:
            self.teacher.train()

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def step(self, crops: list[torch.Tensor], masks: torch.Tensor, epoch: int, it: int) -> dict:
        """One official training iteration on a batch: ``crops`` (global crops first, each
        ``(batch, 3, H, W)``), ``masks`` (iBOT: bool ``(batch, 2, h, w)`` on the global crops' patch grid;
        other methods: an empty ``(batch, 0)``), at iteration ``it`` of ``epoch``.

        Returns the step's metrics: ``step``, ``epoch``, ``loss``, ``lr``, ``wd``, ``momentum`` (with a
        teacher) and the objective's statistics."""
        step = epoch * self.iters + it
        lr, wd = float(self.lr_schedule[step]), float(self.wd_schedule[step])
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:  # only the first group is regularised
                group["weight_decay"] = wd
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        masks = masks.to(self.device, non_blocking=True)

        with self._autocast():
            loss, stats = self.objective(self.student_ddp, self.teacher, crops, masks, epoch)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch}, iteration {it} (rank {self.rt.rank}): training "
                "diverged. Lower the learning rate, the teacher temperature or the EMA rate, or enable "
                "gradient clipping (--clip-grad 3.0); resume from the last checkpoint afterwards.")

        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            if self.cfg.clip_grad:
                clip_gradients(self.student, self.cfg.clip_grad)
            self.objective.on_gradients(self.student, epoch, step)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if self.cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
                clip_gradients(self.student, self.cfg.clip_grad)
            self.objective.on_gradients(self.student, epoch, step)
            self.scaler.step(self.optimizer)
            self.scaler.update()

        row = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "wd": wd}
        if self.ema_pairs:
            m = float(self.momentum_schedule[step])
            with torch.no_grad():  # EMA teacher, written as the official update
                for ps, pt in self.ema_pairs:
                    pt.data.mul_(m).add_((1 - m) * ps.detach().data)
            row["momentum"] = m
        row.update(stats)
        return row

    # -- the run -----------------------------------------------------------------------------------

    def _columns(self) -> list[str]:
        momentum = ["momentum"] if self.teacher is not None else []
        return ["step", "epoch", "loss", "lr", "wd", *momentum, *self.objective.stat_columns, "images_per_s"]

    def fit(self) -> Path:
        cfg, main = self.cfg, self.rt.is_main
        if self.start_epoch >= cfg.epochs:
            log.info("nothing to do: the checkpoint already holds %d of %d epochs", self.start_epoch, cfg.epochs)
            return self.out
        metrics = None
        if main:
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
            metrics = MetricsWriter(self.out, self._columns(), self.start_epoch, cfg.tensorboard)
        images_per_step = cfg.batch_size * self.rt.world_size
        bar = tqdm(total=(cfg.epochs - self.start_epoch) * self.iters * images_per_step, unit="img",
                   disable=not (self.progress and main), dynamic_ncols=True, smoothing=0.1)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                self.sampler.set_epoch(epoch)
                torch.manual_seed(cfg.seed + epoch)  # drop-path draws: a resumed epoch repeats them
                self._train_mode()
                bar.set_description(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}")
                losses, started = [], time.perf_counter()
                last = started
                for it, (crops, masks) in enumerate(self.loader):
                    row = self.step(crops, masks, epoch, it)
                    now = time.perf_counter()  # data loading included: what the run really sustains
                    row["images_per_s"], last = images_per_step / (now - last), now
                    losses.append(row["loss"])
                    if metrics is not None:
                        metrics.write(row)
                    bar.update(images_per_step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                elapsed = time.perf_counter() - started
                record = {"epoch": epoch + 1,
                          "loss": distributed.all_reduce_mean(float(np.mean(losses)), self.device),
                          "images_per_s": self.iters * images_per_step / elapsed}
                self._save(epoch + 1)
                if cfg.knn_every and (epoch + 1) % cfg.knn_every == 0 and main:
                    record.update(self._knn_monitor())
                    metrics.scalar("knn/top1", record["knn_top1"], (epoch + 1) * self.iters)
                if main:
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    metrics.flush()
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return self.out

    def time_steps(self, steps: int = 3, clock=time.perf_counter) -> float:
        """Median seconds per step (data loading included) over ``steps`` steps of the first epoch, after
        one warm-up step; they train the networks and write nothing. For sizing a run to a time budget.
        ``clock``: wall-clock by default; ``time.process_time`` counts this process's CPU time only (data
        loading included with ``num_workers`` 0), whatever else the machine runs."""
        self._train_mode()
        self.sampler.set_epoch(0)
        times, last = [], clock()
        for it, (crops, masks) in zip(range(steps + 1), self.loader):
            self.step(crops, masks, 0, it)
            now = clock()
            times.append(now - last)
            last = now
        if len(times) < 2:
            raise ValueError(f"timing needs at least 2 steps per epoch; this run has {self.iters}")
        return float(np.median(times[1:]))

    def _knn_monitor(self) -> dict:
        from .evaluate import class_count, extract_features, knn_classifier

        cfg = self.cfg
        train_set, val_set = open_dataset(cfg.knn_train), open_dataset(cfg.knn_val)
        num_classes = class_count(train_set, val_set)
        size = cfg.knn_size or cfg.global_size
        backbone = self._served().backbone
        train_feats = extract_features(backbone, train_set, progress=False, size=size)
        val_feats = extract_features(backbone, val_set, progress=False, size=size)
        k = min(cfg.knn_k, len(train_set))
        top1, top5 = knn_classifier(*train_feats, *val_feats, k, DEFAULT_TEMPERATURE, num_classes)
        log.info("k-NN monitor (k=%d, %d px): top-1 %.2f, top-5 %.2f", k, size, top1, top5)
        return {"knn_top1": top1, "knn_top5": top5}


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train (resuming from ``<output>/checkpoint.pth`` or ``cfg.resume``); returns the output directory.

    Writes ``checkpoint.pth`` (resumable) and the served backbone (:func:`backbone_filename`:
    ``teacher_backbone.pth``, or ``backbone.pth`` for the methods of ``methods.py``) after every epoch, per-step
    ``metrics.csv`` (and TensorBoard events), per-epoch ``log.jsonl`` and ``config.json``.
    """
    trainer = Trainer(cfg, progress)
    try:
        return trainer.fit()
    finally:
        distributed.teardown()
