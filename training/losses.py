"""Self-distillation losses.

``DINOLoss`` follows Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*
(ICCV 2021) and the official ``main_dino.py``: the teacher's outputs are centred and sharpened with a
temperature that warms up linearly, every student view is compared with every teacher view of a
*different* crop, and the centre is an EMA of the teacher's batch mean.
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
        batch_center = teacher_output.sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_output)), device=teacher_output.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
