"""The methods DINO grew out of, as objectives of the same trainer: MoCo v3, SimCLR, BYOL, SimSiam, SwAV.

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
which run the network once per view (SwAV normalises all crops together, as its reference does). MoCo v3
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
from .losses import BYOLLoss, MoCoV3Loss, NegativeQueue, NTXentLoss, SimSiamLoss, SwAVLoss
from .models import BackboneSpec, MultiCropWrapper, ViTBackbone, build_backbone

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
    (per-view BatchNorm statistics), or all crops at once with ``joint_head`` (SwAV).
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


class Objective(nn.Module, abc.ABC):
    """A method: its networks and the loss of one step. Its state (MoCo's queue) goes in checkpoints.

    ``forward(student, teacher, crops)`` takes the trained network (possibly DDP-wrapped), the momentum
    encoder (None for methods without one) and the step's crops (global crops first), and returns the
    loss and the step's statistics (``embedding_std`` of the student's first view).
    """

    multi_crop = False  # takes the local crops too; the others see the two global views only
    momentum_encoder = False

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg

    def build_networks(self, spec: BackboneSpec) -> tuple[MethodNetwork, MethodNetwork | None]:
        """The trained network and the momentum encoder (None without one), equal weights at start."""
        student = self._network(spec, spec.drop_path_rate, predictor=True)
        if not self.momentum_encoder:
            return student, None
        return student, momentum_copy(student, self._network(spec, 0.0, predictor=False))

    def _network(self, spec: BackboneSpec, drop_path_rate: float, predictor: bool) -> MethodNetwork:
        backbone = build_backbone(replace(spec, drop_path_rate=drop_path_rate))
        if self.cfg.freeze_patch_embed:
            freeze_patch_projection(backbone)
        return MethodNetwork(backbone, self._head(spec.embed_dim, predictor), joint_head=self.multi_crop)

    @abc.abstractmethod
    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        """The method's projection head (and predictor, where it has one and ``predictor`` is True)."""

    def on_gradients(self, student: nn.Module, step: int) -> None:
        """Called between backward and the optimizer step (SwAV drops the prototypes' gradients)."""


class MomentumPredictor(Objective):
    """MoCo v3 and BYOL: the online network's predictions of both views against the momentum encoder's
    projections of them; ``self.loss(p1, p2, t1, t2)`` is the method's symmetric loss."""

    momentum_encoder = True

    def forward(self, student, teacher, crops):
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


class SimCLR(Objective):
    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.loss = NTXentLoss(cfg.simclr_temperature)

    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        return ProjectionHead(projection_mlp(2, in_dim, self.cfg.hidden_dim, self.cfg.bottleneck_dim, self.cfg.mlp_bn))

    def forward(self, student, teacher, crops):
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


class SimSiam(Objective):
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

    def forward(self, student, teacher, crops):
        (z1, p1), (z2, p2) = student(crops)
        return self.loss(p1, p2, z1, z2), {"embedding_std": embedding_std(z1)}


class SwAV(Objective):
    multi_crop = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.loss = SwAVLoss(cfg.swav_temperature, cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations)

    def _head(self, in_dim: int, predictor: bool) -> nn.Module:
        c = self.cfg
        return SwAVHead(projection_mlp(2, in_dim, c.hidden_dim, c.bottleneck_dim, c.mlp_bn, last_bn=False),
                        c.bottleneck_dim, c.swav_prototypes)

    def forward(self, student, teacher, crops):
        prototypes = _unwrap(student).head.prototypes
        with torch.no_grad():  # projected back onto the sphere before every step, as the reference does
            prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
        outputs = student(crops)
        return self.loss([scores for _, scores in outputs]), {"embedding_std": embedding_std(outputs[0][0])}

    def on_gradients(self, student: nn.Module, step: int) -> None:
        if step < self.cfg.freeze_prototypes_iters:
            student.head.prototypes.weight.grad = None


OBJECTIVES: dict[str, type[Objective]] = {
    "mocov3": MoCoV3, "simclr": SimCLR, "byol": BYOL, "simsiam": SimSiam, "swav": SwAV,
}
