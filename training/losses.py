"""Self-distillation losses.

``DINOLoss`` follows Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*
(ICCV 2021) and the official ``main_dino.py``: the teacher's outputs are centred and sharpened with a
temperature that warms up linearly, every student view is compared with every teacher view of a
*different* crop, and the centre is an EMA of the teacher's batch mean.

``IBOTLoss`` follows Zhou et al., *iBOT: Image BERT Pre-Training with Online Tokenizer* (ICLR 2022) and
``iBOTLoss`` in the official ``bytedance/ibot`` ``main_ibot.py``: the same cross-view CLS distillation
plus masked-image modelling, where the student's patch tokens at masked positions of a global view must
match the teacher's tokens of that view seen unmasked. CLS and patch outputs have their own centres and
teacher temperatures.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant (official ``DINOLoss``)."""
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
    return np.concatenate((warmup, np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp))


class DINOLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher and student distributions.

    Args mirror the official class so configurations port unchanged. ``forward`` takes the student's
    outputs for all ``ncrops`` views stacked crop-major, shape ``(ncrops * batch_size, out_dim)``, and the
    teacher's outputs for the two global views, ``(2 * batch_size, out_dim)``.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_views = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_views = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)

        total, pairs = 0.0, 0
        for t_idx, t in enumerate(teacher_views):
            for s_idx, s in enumerate(student_views):
                if s_idx == t_idx:  # the same crop seen by both networks carries no signal
                    continue
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                pairs += 1
        self.update_center(teacher_output)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = _all_reduce_mean(teacher_output.sum(dim=0, keepdim=True), len(teacher_output))
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


def _all_reduce_mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """``total / count`` with both summed over all ranks when training is distributed."""
    count_t = torch.tensor(float(count), device=total.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count_t)
    return total / count_t


class IBOTLoss(nn.Module):
    """iBOT objective: cross-view CLS self-distillation + same-view masked-patch self-distillation.

    Args mirror the official class. ``forward`` takes

    - ``student_output``: ``(cls, patch)`` for the ``ngcrops`` global views, crop-major, shapes
      ``(ngcrops * batch_size, out_dim)`` and ``(ngcrops * batch_size, num_patches, patch_out_dim)``;
      the student saw the global views with their masks applied;
    - ``teacher_output``: the same pair from the teacher on the unmasked global views;
    - ``student_local_cls``: ``(nlcrops * batch_size, out_dim)`` CLS outputs for the local crops, or
      ``None`` when ``nlcrops == 0``;
    - ``student_mask``: ``ngcrops`` boolean masks, each ``(batch_size, h, w)`` with ``h * w ==
      num_patches``, True where the student's patch was masked;
    - ``epoch``: index into both teacher temperature schedules.

    Returns ``{"cls", "patch", "loss"}`` where ``cls`` is ``lambda1`` × the CLS cross-entropy averaged
    over every (teacher global view q, student view v ≠ q) pair, ``patch`` is ``lambda2`` × the patch
    cross-entropy averaged over the masked patches of each image (an image without masked patches
    contributes 0), then over images and views, and ``loss = cls + patch``, as in the official code.

    Before ``mim_start_epoch`` the patch temperature stays at ``warmup_teacher_temp2``; its warm-up
    starts at that epoch.
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        ngcrops: int,
        nlcrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp2: float,
        teacher_temp2: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum2: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        mim_start_epoch: int = 0,
    ):
        super().__init__()
        self.ngcrops = ngcrops
        self.nlcrops = nlcrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum2 = center_momentum2
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )
        self.teacher_temp2_schedule = np.concatenate((
            np.full(mim_start_epoch, warmup_teacher_temp2),
            teacher_temperature_schedule(
                warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs - mim_start_epoch
            ),
        ))

    def forward(
        self,
        student_output: tuple[torch.Tensor, torch.Tensor],
        teacher_output: tuple[torch.Tensor, torch.Tensor],
        student_local_cls: torch.Tensor | None,
        student_mask: list[torch.Tensor],
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        ncrops = self.ngcrops + self.nlcrops
        if len(student_cls) != ncrops * (len(teacher_cls) // self.ngcrops):
            raise ValueError(
                f"expected student CLS outputs for {self.ngcrops} global + {self.nlcrops} local crops "
                f"({ncrops} x {len(teacher_cls) // self.ngcrops} rows), got {len(student_cls)} rows"
            )

        student_cls_views = (student_cls / self.student_temp).chunk(ncrops)
        student_patch_views = (student_patch / self.student_temp).chunk(self.ngcrops)
        temp, temp2 = self.teacher_temp_schedule[epoch], self.teacher_temp2_schedule[epoch]
        teacher_cls_views = F.softmax((teacher_cls - self.center) / temp, dim=-1).detach().chunk(self.ngcrops)
        teacher_patch_views = F.softmax((teacher_patch - self.center2) / temp2, dim=-1).detach()
        teacher_patch_views = teacher_patch_views.chunk(self.ngcrops)

        cls_total, cls_pairs = 0.0, 0
        patch_total, patch_views = 0.0, 0
        for q, teacher_q in enumerate(teacher_cls_views):
            for v, student_v in enumerate(student_cls_views):
                if v == q:
                    # Same view: only the masked patches, per image, carry the MIM signal.
                    log_probs = F.log_softmax(student_patch_views[v], dim=-1)
                    per_patch = torch.sum(-teacher_patch_views[q] * log_probs, dim=-1)
                    mask = student_mask[v].flatten(-2, -1).to(per_patch.dtype)
                    per_image = (per_patch * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                    patch_total = patch_total + per_image.mean()
                    patch_views += 1
                else:
                    cls_total = cls_total + torch.sum(-teacher_q * F.log_softmax(student_v, dim=-1), dim=-1).mean()
                    cls_pairs += 1
        cls_loss = cls_total / cls_pairs * self.lambda1
        patch_loss = patch_total / patch_views * self.lambda2
        self.update_center(teacher_cls, teacher_patch)
        return {"cls": cls_loss, "patch": patch_loss, "loss": cls_loss + patch_loss}

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """EMA of the teacher's mean CLS output and of its mean patch output (over images and patches)."""
        cls_center = _all_reduce_mean(teacher_cls.sum(dim=0, keepdim=True), len(teacher_cls))
        self.center.mul_(self.center_momentum).add_(cls_center * (1 - self.center_momentum))
        patch_center = _all_reduce_mean(teacher_patch.mean(dim=1).sum(dim=0, keepdim=True), len(teacher_patch))
        self.center2.mul_(self.center_momentum2).add_(patch_center.unsqueeze(0) * (1 - self.center_momentum2))
