"""The training methods as objectives of one trainer: DINO and iBOT, and the methods DINO grew out of
(MoCo v3, SimCLR, BYOL, SimSiam, SwAV).

- **DINO** (Caron et al., ICCV 2021; facebookresearch/dino ``main_dino.py``): student and EMA teacher of
  backbone + ``DINOHead``; the teacher sees the two global crops, the student every crop (``DINOLoss``);
  the prototypes' gradients are dropped during the first ``freeze_last_layer`` epochs.
- **iBOT** (Zhou et al., ICLR 2022; bytedance/ibot ``main_ibot.py``): the same plus masked-image modelling;
  the student sees the global crops with block masks and the local crops unmasked, the teacher the
  global crops unmasked (``IBOTLoss``). As the official code, the teacher has no mask token and, with
  ``shared_head_teacher`` (the official default), one set of prototypes for its CLS and patch tokens.

Each objective builds its networks around the same timm ViT backbone the DINO path trains and exports
(``backbone.*`` keys, the method's MLPs under ``head.*``) and computes its loss for one step from the
trainer's crops; the trainer keeps the data pipeline, schedules, EMA, DDP, checkpoints and export.

- **MoCo v3** (Chen, Xie & He, ICCV 2021; ``facebookresearch/moco-v3`` ``moco/builder.py``, ``MoCo_ViT``):
  query encoder = backbone + 3-layer projector + 2-layer predictor, key encoder = momentum copy of backbone
  + projector; symmetric InfoNCE over the all-gathered keys (``MoCoV3Loss``), optionally with a MoCo v2
  queue of negatives, optionally the fixed random patch projection of ``vits.py`` (``stop_grad_conv1``).
- **SimCLR** (Chen et al., ICML 2020): backbone + 2-layer projector with BN, NT-Xent (``NTXentLoss``).
- **BYOL** (Grill et al., NeurIPS 2020): online backbone + projector + predictor, momentum target of backbone
  + projector, symmetrised normalised MSE (``BYOLLoss``).
- **SimSiam** (Chen & He, CVPR 2021; ``facebookresearch/simsiam`` ``simsiam/builder.py``): backbone +
  3-layer projector + bottleneck predictor, negative cosine with stop-gradient, no momentum encoder.
- **SwAV** (Caron et al., NeurIPS 2020; ``facebookresearch/swav`` ``main_swav.py``): backbone + 2-layer
  projector, L2 normalisation, prototypes re-normalised before every step and frozen for the first
  ``freeze_prototypes_iters`` steps, Sinkhorn-Knopp codes and swapped prediction over multi-crop
  (``SwAVLoss``).

Each view goes through the MLPs on its own, so BatchNorm statistics are per view as in the references,
which run the network once per view; SimCLR and SwAV normalise all crops together, as theirs do
(google-research/simclr computes one batch of 2N augmented images). MoCo v3
and BYOL evaluate the online (query) encoder, so that is the backbone these methods serve. The momentum
encoder is updated after the optimizer step, with the trainer's EMA (MoCo v3 updates it before computing
the keys; the difference is one step of the schedule).
"""

from __future__ import annotations

import abc
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .losses import BYOLLoss, DINOLoss, IBOTLoss, MoCoV3Loss, NegativeQueue, NTXentLoss, SimSiamLoss, SwAVLoss
from .models import (BackboneSpec, DINOHead, IBOTHead, MaskedMultiCropWrapper, MultiCropWrapper, ViTBackbone,
                     build_backbone)

Head = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def projection_mlp(layers: int, in_dim: int, hidden_dim: int, out_dim: int, use_bn: bool = True,
                   last_bn: bool = True) -> nn.Sequential:
    """``layers`` linear layers with BatchNorm and ReLU between them, as ``_build_mlp`` of MoCo v3.

    With ``use_bn`` every hidden layer is Linear (no bias: BN follows) → BN → ReLU and, with ``last_bn``,
    the output is normalised by a BN without affine parameters (SimCLR's design, kept by MoCo v3 and
    SimSiam). Without ``use_bn`` the linear layers keep their biases and there is no BN at all.
    """
    mlp: list[nn.Module] = []
    for layer in range(layers):
        first, last = layer == 0, layer == layers - 1
        dim_in, dim_out = in_dim if first else hidden_dim, out_dim if last else hidden_dim
        bn = use_bn and (last_bn or not last)
        mlp.append(nn.Linear(dim_in, dim_out, bias=not bn))
        if bn:
            mlp.append(nn.BatchNorm1d(dim_out, affine=not last))
        if not last:
            mlp.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mlp)


class ProjectionHead(nn.Module):
    """Projector MLP, optionally followed by a predictor MLP.

    ``(batch_size, in_dim)`` → the projection ``z`` ``(batch_size, out_dim)``, or ``(z, predictor(z))``
    with a predictor.
    """

    def __init__(self, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.projector = projector
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> Head:
        z = self.projector(x)
        return z if self.predictor is None else (z, self.predictor(z))


class SwAVHead(nn.Module):
    """SwAV's projection head (``resnet50.py``, ``forward_head``): projector MLP, L2 normalisation, then
    the prototypes, a bias-free linear layer whose rows the objective keeps at unit norm.

    ``(batch_size, in_dim)`` → ``(z, scores)``: the normalised projection ``(batch_size, out_dim)`` and its
    cosine similarity to every prototype ``(batch_size, num_prototypes)``.
    """

    def __init__(self, projector: nn.Module, out_dim: int, num_prototypes: int):
        super().__init__()
        self.projector = projector
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.projector(x), dim=1)
        return z, self.prototypes(z)


class MethodNetwork(MultiCropWrapper):
    """Backbone + a method's head over a list of crops; returns the head's output for each crop.

    Crops of one resolution go through the backbone together; the head sees each crop's batch on its own
    (per-view BatchNorm statistics), or all crops at once with ``joint_head`` (SimCLR, SwAV).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, joint_head: bool = False):
        super().__init__(backbone, head)
        self.joint_head = joint_head

    def forward(self, crops: list[torch.Tensor]) -> list[Head]:
        features = self.backbone_features(crops)
        if not self.joint_head:
            return [self.head(f) for f in features.chunk(len(crops))]
        out = self.head(features)
        if isinstance(out, torch.Tensor):
            return list(out.chunk(len(crops)))
        return list(zip(*(part.chunk(len(crops)) for part in out)))


def freeze_patch_projection(backbone: ViTBackbone) -> None:
    """MoCo v3's random patch projection (``vits.py``, ``stop_grad_conv1``): Xavier-uniform weights and
    zero bias, never trained. The paper traces ViT training instability to the patch projection's
    gradient spikes; fixing it at random removes them at no cost in accuracy."""
    proj = backbone.patch_embed.proj
    bound = math.sqrt(6.0 / float(3 * proj.kernel_size[0] * proj.kernel_size[1] + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    proj.weight.requires_grad = False
    proj.bias.requires_grad = False


def embedding_std(z: torch.Tensor) -> float:
    """SimSiam's collapse indicator (Chen & He, 2021, section 4.1): the standard deviation over the batch
    of the L2-normalised outputs ``(batch_size, dim)``, averaged over channels. 0 when every image has the
    same output; about ``1 / sqrt(dim)`` when the outputs are spread over the sphere."""
    return float(F.normalize(z.detach().float(), dim=1).std(dim=0).mean())


def momentum_copy(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """``teacher`` with the weights of the ``student``'s modules of the same names (the teacher has no
    predictor), frozen: the momentum encoder at step 0."""
    weights = student.state_dict()
    teacher.load_state_dict({name: weights[name] for name in teacher.state_dict()})
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, DistributedDataParallel) else network


def teacher_statistics(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> tuple[float, float]:
    """Collapse indicators of the teacher's centred, sharpened distribution ``(batch, K)``.

    Returns the mean per-image entropy (→ log K when every output is uniform) and the KL divergence of
    the batch-mean distribution from uniform (→ log K when every image picks the same prototype). DINO's
    paper (section 5.3) tracks the pair: a healthy run has a low entropy and a high but bounded KL.
    """
    with torch.no_grad():
        probs = F.softmax((teacher_logits.float() - center.float()) / temp, dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1).mean()
        mean = probs.mean(dim=0)
        kl_uniform = (mean * torch.log(mean.clamp_min(1e-12) * probs.shape[-1])).sum()
    return float(entropy), float(kl_uniform)


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Official ``utils.cancel_gradients_last_layer``: no update of the prototypes (every parameter whose
    name holds ``last_layer``) during the first ``freeze_last_layer`` epochs."""
    if epoch < freeze_last_layer:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None


class Objective(nn.Module, abc.ABC):
    """A method: its networks and the loss of one step, as the trainer's only method-specific part.

    ``forward(student, teacher, crops, masks, epoch)`` takes the trained network (possibly DDP-wrapped),
    the momentum encoder or teacher (None for methods without one), the step's crops (global crops first),
    the iBOT masks ``(batch, 2, h, w)`` (empty otherwise) and the epoch, and returns the loss and the
    step's statistics (named in ``stat_columns``).
    """

    multi_crop = False  # takes the local crops too; the others see the two global views only
    joint_head = False  # the head sees every crop of a step in one batch
    momentum_encoder = False
    uses_masks = False  # iBOT's masked-image modelling: the data pipeline draws block masks
    serves_teacher = False  # the served backbone is the teacher's (DINO, iBOT) rather than the student's
    stat_columns: tuple[str, ...] = ("embedding_std",)

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg

    @abc.abstractmethod
    def build_networks(self, spec: BackboneSpec) -> tuple[nn.Module, nn.Module | None]:
        """The trained network and the teacher or momentum encoder (None without one), equal weights at
        start."""

    def on_gradients(self, student: nn.Module, epoch: int, step: int) -> None:
        """Called between backward (and clipping) and the optimizer step (SwAV, DINO and iBOT drop the
        prototypes' gradients for a while)."""

    def schedule_values(self, epoch: int) -> dict[str, float]:
        """Per-epoch values of the method's own schedules, for the metrics (teacher temperatures)."""
        return {}

    def loss_state(self) -> dict:
        """What checkpoints keep of the objective (its centres, queue), under ``<method>_loss``."""
        return self.state_dict()

    def load_loss_state(self, state: dict) -> None:
        self.load_state_dict(state)


class ProjectionObjective(Objective):
    """The contrastive and Siamese methods: a projection head (and predictor) on the backbone, every view
    through the head on its own unless ``joint_head``."""

    def build_networks(self, spec: BackboneSpec) -> tuple[MethodNetwork, MethodNetwork | None]:
        student = self._network(spec, spec.drop_path_rate, predictor=True)
        if not self.momentum_encoder:
            return student, None
        return student, momentum_copy(student, self._network(spec, 0.0, predictor=False))

    def _network(self, spec: BackboneSpec, drop_path_rate: float, predictor: bool) -> MethodNetwork:
        backbone = build_backbone(replace(spec, drop_path_rate=drop_path_rate))
        if self.cfg.freeze_patch_embed:
            freeze_patch_projection(backbone)
        return MethodNetwork(backbone, self._head(spec.embed_dim, predictor), joint_head=self.joint_head)

    @abc.abstractmethod
    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        """The method's projection head (and predictor, where it has one and ``predictor`` is True)."""


class SelfDistillation(Objective):
    """DINO and iBOT: the served network is the EMA teacher, the loss module holds the centre(s) and the
    teacher temperature schedule, and checkpoints keep that module's state (official ``dino_loss`` /
    ``ibot_loss``)."""

    multi_crop = True
    momentum_encoder = True
    serves_teacher = True
    stat_columns = ("teacher_temp", "teacher_entropy", "teacher_kl_uniform")

    def build_networks(self, spec: BackboneSpec) -> tuple[nn.Module, nn.Module]:
        student, teacher = self._network(spec, spec.drop_path_rate, True), self._network(spec, 0.0, False)
        return student, momentum_copy(student, teacher)

    @abc.abstractmethod
    def _network(self, spec: BackboneSpec, drop_path_rate: float, student: bool) -> nn.Module:
        """Backbone + head of the student or of the teacher."""

    def on_gradients(self, student: nn.Module, epoch: int, step: int) -> None:
        cancel_last_layer_gradients(student, epoch, self.cfg.freeze_last_layer)

    def schedule_values(self, epoch: int) -> dict[str, float]:
        return {"teacher_temp": float(self.loss.teacher_temp_schedule[epoch])}

    def loss_state(self) -> dict:
        return self.loss.state_dict()

    def load_loss_state(self, state: dict) -> None:
        self.loss.load_state_dict(state)


class DINO(SelfDistillation):
    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        warmup = min(cfg.warmup_teacher_temp_epochs, cfg.epochs)
        self.loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                             warmup, cfg.epochs, cfg.student_temp, cfg.center_momentum)

    def _network(self, spec: BackboneSpec, drop_path_rate: float, student: bool) -> nn.Module:
        c = self.cfg
        backbone = build_backbone(replace(spec, drop_path_rate=drop_path_rate))
        return MultiCropWrapper(backbone, DINOHead(spec.embed_dim, c.out_dim, c.hidden_dim, c.bottleneck_dim,
                                                   use_bn=c.use_bn_in_head, norm_last_layer=c.norm_last_layer))

    def forward(self, student, teacher, crops, masks, epoch):
        with torch.no_grad():  # the official code runs it with grad, but the teacher has none to take
            teacher_out = teacher(crops[:2])
        student_out = student(crops)
        temp = float(self.loss.teacher_temp_schedule[epoch])
        entropy, kl = teacher_statistics(teacher_out, self.loss.center, temp)
        loss = self.loss(student_out, teacher_out, epoch)
        return loss, {"teacher_temp": temp, "teacher_entropy": entropy, "teacher_kl_uniform": kl}


class IBOT(SelfDistillation):
    uses_masks = True
    stat_columns = ("cls_loss", "patch_loss", "masked_ratio", "teacher_patch_temp", *SelfDistillation.stat_columns)

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        warmup = min(cfg.warmup_teacher_temp_epochs, cfg.epochs)
        # As main_ibot.py: a teacher sharing its prototypes scores the patch tokens on the CLS ones.
        patch_dim = cfg.out_dim if cfg.shared_head or cfg.shared_head_teacher else cfg.patch_out_dim
        self.loss = IBOTLoss(
            cfg.out_dim, patch_dim, 2, cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
            cfg.warmup_teacher_patch_temp, cfg.teacher_patch_temp, warmup, cfg.epochs, cfg.student_temp,
            cfg.center_momentum, cfg.center_momentum, cfg.lambda1, cfg.lambda2,
            mim_start_epoch=min(cfg.pred_start_epoch, cfg.epochs))

    def _network(self, spec: BackboneSpec, drop_path_rate: float, student: bool) -> nn.Module:
        c = self.cfg
        backbone = build_backbone(replace(spec, drop_path_rate=drop_path_rate), masked_im_modeling=student)
        return MaskedMultiCropWrapper(backbone, IBOTHead(
            spec.embed_dim, c.out_dim, c.patch_out_dim, c.hidden_dim, c.bottleneck_dim,
            norm_last_layer=c.norm_last_layer if student else True,
            shared_head=c.shared_head if student else c.shared_head_teacher))

    def schedule_values(self, epoch: int) -> dict[str, float]:
        return {**super().schedule_values(epoch),
                "teacher_patch_temp": float(self.loss.teacher_temp2_schedule[epoch])}

    def forward(self, student, teacher, crops, masks, epoch):
        global_crops = torch.cat(crops[:2])
        crop_masks = [masks[:, 0], masks[:, 1]]
        with torch.no_grad():
            teacher_cls, teacher_patch, _ = teacher(global_crops)
        student_cls, student_patch, local_cls = student(global_crops, torch.cat(crop_masks), crops[2:])
        values = self.schedule_values(epoch)
        entropy, kl = teacher_statistics(teacher_cls, self.loss.center, values["teacher_temp"])
        parts = self.loss((student_cls, student_patch), (teacher_cls, teacher_patch), local_cls, crop_masks, epoch)
        return parts["loss"], {**values, "cls_loss": parts["cls"].item(), "patch_loss": parts["patch"].item(),
                               "teacher_entropy": entropy, "teacher_kl_uniform": kl,
                               "masked_ratio": float(masks.float().mean())}


class MomentumPredictor(ProjectionObjective):
    """MoCo v3 and BYOL: the online network's predictions of both views against the momentum encoder's
    projections of them; ``self.loss(p1, p2, t1, t2)`` is the method's symmetric loss."""

    momentum_encoder = True

    def forward(self, student, teacher, crops, masks, epoch):
        (z1, p1), (z2, p2) = student(crops)
        with torch.no_grad():
            t1, t2 = teacher(crops)
        return self.loss(p1, p2, t1, t2), {"embedding_std": embedding_std(z1)}


class MoCoV3(MomentumPredictor):
    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        queue = NegativeQueue(cfg.bottleneck_dim, cfg.queue_size) if cfg.queue_size else None
        self.loss = MoCoV3Loss(cfg.moco_temperature, queue)

    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        c = self.cfg
        return ProjectionHead(
            projection_mlp(3, in_dim, c.hidden_dim, c.bottleneck_dim, c.mlp_bn),
            projection_mlp(2, c.bottleneck_dim, c.hidden_dim, c.bottleneck_dim, c.mlp_bn) if predictor else None)


class SimCLR(ProjectionObjective):
    joint_head = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.loss = NTXentLoss(cfg.simclr_temperature)

    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        return ProjectionHead(projection_mlp(2, in_dim, self.cfg.hidden_dim, self.cfg.bottleneck_dim, self.cfg.mlp_bn))

    def forward(self, student, teacher, crops, masks, epoch):
        z1, z2 = student(crops)
        return self.loss(z1, z2), {"embedding_std": embedding_std(z1)}


class BYOL(MomentumPredictor):
    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.loss = BYOLLoss()

    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        c = self.cfg
        return ProjectionHead(
            projection_mlp(2, in_dim, c.hidden_dim, c.bottleneck_dim, c.mlp_bn, last_bn=False),
            projection_mlp(2, c.bottleneck_dim, c.hidden_dim, c.bottleneck_dim, c.mlp_bn, last_bn=False)
            if predictor else None)


class SimSiam(ProjectionObjective):
    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.loss = SimSiamLoss()

    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        c = self.cfg
        # The reference's bottleneck predictor: 2048 → 512 → 2048, a quarter of the projection width.
        return ProjectionHead(
            projection_mlp(3, in_dim, c.hidden_dim, c.bottleneck_dim, c.mlp_bn),
            projection_mlp(2, c.bottleneck_dim, max(c.bottleneck_dim // 4, 1), c.bottleneck_dim, c.mlp_bn,
                           last_bn=False))

    def forward(self, student, teacher, crops, masks, epoch):
        (z1, p1), (z2, p2) = student(crops)
        return self.loss(p1, p2, z1, z2), {"embedding_std": embedding_std(z1)}


class SwAV(ProjectionObjective):
    multi_crop = True
    joint_head = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.loss = SwAVLoss(cfg.swav_temperature, cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations)

    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        c = self.cfg
        return SwAVHead(projection_mlp(2, in_dim, c.hidden_dim, c.bottleneck_dim, c.mlp_bn, last_bn=False),
                        c.bottleneck_dim, c.swav_prototypes)

    def forward(self, student, teacher, crops, masks, epoch):
        prototypes = _unwrap(student).head.prototypes
        with torch.no_grad():  # projected back onto the sphere before every step, as the reference does
            prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
        outputs = student(crops)
        return self.loss([scores for _, scores in outputs]), {"embedding_std": embedding_std(outputs[0][0])}

    def on_gradients(self, student: nn.Module, epoch: int, step: int) -> None:
        if step < self.cfg.freeze_prototypes_iters:
            student.head.prototypes.weight.grad = None


OBJECTIVES: dict[str, type[Objective]] = {
    "dino": DINO, "ibot": IBOT, "mocov3": MoCoV3, "simclr": SimCLR, "byol": BYOL, "simsiam": SimSiam, "swav": SwAV,
}
