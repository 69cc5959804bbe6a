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

The objectives DINO grew out of, with the conventions of their official code so numbers port:
``MoCoV3Loss`` (``facebookresearch/moco-v3`` ``moco/builder.py``, optionally with a MoCo v2-style
``NegativeQueue``), ``NTXentLoss`` (SimCLR, Chen et al., ICML 2020), ``BYOLLoss`` (Grill et al., NeurIPS
2020), ``SimSiamLoss`` (``facebookresearch/simsiam`` ``main_simsiam.py``), and ``sinkhorn_knopp`` /
``SwAVLoss`` (``facebookresearch/swav`` ``main_swav.py``, without the queue). Under ``torch.distributed``
the contrastive negatives and the Sinkhorn sums span all ranks, so two ranks with half the batch each
give the loss of one process with the whole batch (every rank must hold the same local batch size).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BYOLLoss",
    "DINOLoss",
    "IBOTLoss",
    "MoCoV3Loss",
    "NTXentLoss",
    "NegativeQueue",
    "SimSiamLoss",
    "SwAVLoss",
    "sinkhorn_knopp",
    "teacher_temperature_schedule",
]


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks, in place (unchanged when not distributed)."""
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sends every rank's gradient for a row to its owner.

    Each rank's loss depends on every rank's rows, so the gradient of a local row is the sum over ranks
    of the gradients of their gathered copies (as the cross-replica concat in ``google-research/simclr``).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def _gather_rows(tensor: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, int]:
    """Rows of every rank in rank order, and the index of this rank's first row among them."""
    if not _distributed():
        return tensor, 0
    offset = dist.get_rank() * len(tensor)
    if with_grad:
        return _AllGatherWithGrad.apply(tensor), offset
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts), offset


class NegativeQueue(nn.Module):
    """MoCo v2-style FIFO of ``size`` past keys of width ``dim``, used as extra negatives.

    ``enqueue`` writes the newest keys over the oldest (enqueue and dequeue in one step); ``negatives``
    returns the keys held. Unlike MoCo v2, which fills the queue with random vectors at start, it starts
    empty and grows until full, so no random vectors act as negatives and every rank holds the same
    keys without a broadcast (the keys enqueued are gathered from all ranks).
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def negatives(self) -> torch.Tensor:
        """The keys held, ``(min(enqueued, size), dim)``, in no particular order."""
        return self.keys[: int(self.filled)]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries with ``keys`` ``(n, dim)``; with ``n > size`` only the last ``size`` fit."""
        keys = keys.detach()[-self.size:]
        slots = (self.pointer + torch.arange(len(keys), device=keys.device)) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.pointer.copy_((self.pointer + len(keys)) % self.size)
        self.filled.copy_((self.filled + len(keys)).clamp(max=self.size))


class MoCoV3Loss(nn.Module):
    """Symmetric InfoNCE of MoCo v3 (Chen, Xie & He, ICCV 2021), as ``moco-v3/moco/builder.py``.

    ``forward(q1, q2, k1, k2)`` takes the predictor outputs of the two views, ``(batch_size, dim)``, and
    the momentum encoder's outputs of the same views, and returns ``ctr(q1, k2) + ctr(q2, k1)``, where
    ``ctr(q, k)`` is the cross-entropy of the L2-normalised ``q · kᵀ / temperature`` with the matching key
    as target, multiplied by ``2 * temperature`` (the reference's scaling, which makes the gradient
    magnitude independent of the temperature).

    Keys are targets: they are detached, and when distributed they are all-gathered *without* gradient
    (the reference's ``concat_all_gather``), with each rank's targets offset by rank × local batch size.

    With a ``queue`` (MoCo v2 style), its keys are extra negatives for every query, and after the loss
    the step's normalised keys of both views, from all ranks, are enqueued.
    """

    def __init__(self, temperature: float = 0.2, queue: NegativeQueue | None = None):
        super().__init__()
        self.temperature = temperature
        self.queue = queue

    def forward(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        k1_all, offset = _gather_rows(F.normalize(k1.detach(), dim=1), with_grad=False)
        k2_all, _ = _gather_rows(F.normalize(k2.detach(), dim=1), with_grad=False)
        # a copy: enqueue below overwrites the buffer that backward still needs
        queued = self.queue.negatives().clone() if self.queue is not None else None
        loss = self._contrastive(q1, k2_all, offset, queued) + self._contrastive(q2, k1_all, offset, queued)
        if self.queue is not None:
            self.queue.enqueue(torch.cat([k1_all, k2_all]))
        return loss

    def _contrastive(
        self, q: torch.Tensor, keys: torch.Tensor, offset: int, queued: torch.Tensor | None
    ) -> torch.Tensor:
        q = F.normalize(q, dim=1)
        logits = q @ keys.T
        if queued is not None:
            logits = torch.cat([logits, q @ queued.T], dim=1)
        targets = torch.arange(len(q), device=q.device) + offset
        return F.cross_entropy(logits / self.temperature, targets) * (2 * self.temperature)


class NTXentLoss(nn.Module):
    """NT-Xent of SimCLR (Chen et al., *A Simple Framework for Contrastive Learning of Visual
    Representations*, ICML 2020, eq. 1): the mean over the 2N anchors of
    ``-log exp(sim(a, a⁺) / T) / Σ_{b ≠ a} exp(sim(a, b) / T)``, sim the cosine similarity, where the
    2N − 1 other views are the positive and 2(N − 1) negatives.

    ``forward(z1, z2)`` takes the projections of the two views, ``(batch_size, dim)``. When distributed,
    the candidates are all ranks' views, gathered *with* gradient as the cross-replica concat in
    ``google-research/simclr`` does, so N is the global batch. The paper's mean over anchors is half the
    official code's ``loss_a + loss_b``.
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        z1_all, offset = _gather_rows(z1, with_grad=True)
        z2_all, _ = _gather_rows(z2, with_grad=True)
        total = len(z1_all)
        local = torch.arange(len(z1), device=z1.device) + offset
        own = torch.cat([local, local + total])  # an anchor's own column among the 2N candidates
        positive = torch.cat([local + total, local])
        logits = torch.cat([z1, z2]) @ torch.cat([z1_all, z2_all]).T / self.temperature
        logits = logits.masked_fill(F.one_hot(own, 2 * total).bool(), float("-inf"))
        return F.cross_entropy(logits, positive)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1)


class BYOLLoss(nn.Module):
    """BYOL's normalised MSE (Grill et al., NeurIPS 2020, eq. 2), symmetrised.

    ``forward(p1, p2, z1, z2)``: online predictions ``p`` and target projections ``z`` of the two views,
    ``(batch_size, dim)``; returns ``(2 − 2·cos(p1, z2)).mean() + (2 − 2·cos(p2, z1)).mean()``, where
    ``2 − 2·cos(p, z) = ‖p/‖p‖ − z/‖z‖‖²``. The targets are detached.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * _cosine(p1, z2.detach())).mean() + (2 - 2 * _cosine(p2, z1.detach())).mean()


class SimSiamLoss(nn.Module):
    """SimSiam's symmetric negative cosine with stop-gradient (Chen & He, CVPR 2021), as
    ``simsiam/main_simsiam.py``.

    ``forward(p1, p2, z1, z2)``: predictions ``p`` and projections ``z`` of the two views,
    ``(batch_size, dim)``; returns ``−½·(cos(p1, z2).mean() + cos(p2, z1).mean())`` with ``z`` detached.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return -0.5 * (_cosine(p1, z2.detach()).mean() + _cosine(p2, z1.detach()).mean())


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's equipartitioned soft codes (Caron et al., NeurIPS 2020), as ``distributed_sinkhorn`` in
    ``swav/main_swav.py``.

    ``scores``: ``(batch_size, num_prototypes)`` similarities to the prototypes. ``Q = exp(scores / ε)ᵀ``
    is normalised to sum 1, then ``iterations`` times every prototype's row is scaled to total 1/K and
    every sample's column to 1/B; the codes are ``B · Q``, transposed back to ``(batch_size, K)``. Each
    sample's codes sum to 1; each prototype's codes approach B/K as the iterations grow. When
    distributed, B is the global batch and the sums over samples are all-reduced. No gradient.
    """
    # exp of a shifted argument: the constant factor vanishes in the first normalisation, and the
    # shift keeps exp(score / 0.05) finite for scores beyond cosine range.
    shift = scores.max()
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((scores - shift) / epsilon).T
    num_prototypes = q.shape[0]
    batch = q.shape[1] * (dist.get_world_size() if _distributed() else 1)
    q /= _all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    return (q * batch).T


class SwAVLoss(nn.Module):
    """SwAV's swapped prediction (Caron et al., NeurIPS 2020), as ``swav/main_swav.py`` without the queue.

    ``forward(scores)`` takes one ``(batch_size, num_prototypes)`` tensor per crop (global crops first,
    multi-crop views after), the similarities of the normalised features to the normalised prototypes.
    For each crop in ``crops_for_assign`` the codes come from ``sinkhorn_knopp`` (no gradient) and every
    other crop predicts them with ``softmax(scores / temperature)``; the cross-entropies are averaged
    over the predicting crops, then over the assigned crops.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
    ):
        super().__init__()
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.crops_for_assign = tuple(crops_for_assign)

    def forward(self, scores: Sequence[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for assigned in self.crops_for_assign:
            codes = sinkhorn_knopp(scores[assigned], self.epsilon, self.sinkhorn_iterations)
            predictions = [
                -(codes * F.log_softmax(crop / self.temperature, dim=1)).sum(dim=1).mean()
                for v, crop in enumerate(scores) if v != assigned
            ]
            total = total + sum(predictions) / len(predictions)
        return total / len(self.crops_for_assign)
