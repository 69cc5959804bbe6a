"""Training configuration: every hyper-parameter with its default and why (torch-free, so the
command line can be built without importing torch), and presets reproducing the official recipes."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class TrainConfig:
    """Hyper-parameters. Defaults are ``main_dino.py``'s; ``method = "ibot"`` without a preset takes
    ``main_ibot.py``'s where they differ (``METHOD_DEFAULTS``), when built through :meth:`build`."""

    data: str = ""
    output: str = "runs/dino"
    method: str = "dino"
    arch: str = "vit_small"
    patch_size: int = 16
    img_size: int = 224  # size of the position-embedding grid (× patch); other sizes are interpolated
    stem: str = "patch"  # "patch": the official patch projection; "conv": a convolutional stem of the same stride
    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.0005  # for a batch of 256; scaled linearly with the batch size
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996  # EMA rate, cosine-increased to 1 over training
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn_in_head: bool = False  # BatchNorm in the DINO head's MLP (official --use_bn_in_head; DINO only)
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04  # values above 0.07 were unstable in the paper
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    clip_grad: float = 3.0
    freeze_last_layer: int = 1  # epochs during which the prototypes stay fixed
    drop_path_rate: float = 0.1
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    color_jitter: float = 1.0  # multiplies DINO's colour-jitter strengths; raise it where colour must not matter
    grayscale_p: float = 0.2
    # Synthetic data only: images from plain shapes to the generator's range over this many epochs, new ones every
    # epoch (core.synthetic.ShapeCurriculum; 0: off, the data spec's images every epoch).
    curriculum_epochs: int = 0
    # iBOT (method = "ibot"): masked-image modelling on the global crops' patch tokens.
    patch_out_dim: int = 8192
    shared_head: bool = False  # one set of prototypes for the student's CLS and patch tokens
    shared_head_teacher: bool = True  # the same for the teacher (official default: shared)
    pred_ratio: tuple[float, ...] = (0.0, 0.3)  # masking ratios, one drawn per global crop
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)  # ± range around each ratio
    pred_aspect: float = 0.3  # blocks' aspect ratio is log-uniform in [pred_aspect, 1 / pred_aspect]
    pred_start_epoch: int = 0  # no masking (and the patch loss at its warm-up temperature) before it
    lambda1: float = 1.0  # weight of the CLS loss
    lambda2: float = 1.0  # weight of the masked-patch loss
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    # The methods DINO grew out of (training/methods.py): two global views each (SwAV: plus the local
    # crops), projection MLPs hidden_dim wide with bottleneck_dim outputs; momentum_teacher drives the
    # momentum encoders of MoCo v3 and BYOL.
    mlp_bn: bool = True  # BatchNorm in their projection / prediction MLPs; BYOL collapses without it
    moco_temperature: float = 0.2  # MoCo v3's InfoNCE temperature for ViTs
    queue_size: int = 0  # MoCo v3: a MoCo v2-style queue of this many past keys as extra negatives (0: off)
    freeze_patch_embed: bool = False  # MoCo v3's fixed random patch projection, which avoids its ViT instability
    simclr_temperature: float = 0.5
    swav_temperature: float = 0.1
    swav_prototypes: int = 3000
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_iters: int = 313  # SwAV: steps during which the prototypes do not move
    # Runtime.
    device: str = "auto"  # auto: CUDA when available
    precision: str = "auto"  # auto: fp16 autocast + grad scaler on GPUs (the official recipes), fp32 on CPU
    num_workers: int = 2
    seed: int = 0
    saveckp_freq: int = 0  # also keep checkpoint<epochs done>.pth every N epochs (0: only checkpoint.pth)
    resume: str = ""  # checkpoint to continue from; default: <output>/checkpoint.pth when it exists
    tensorboard: bool = True  # TensorBoard event files in <output>/tensorboard (needs the tensorboard package)
    knn_every: int = 0  # k-NN monitor every N epochs on knn_train / knn_val (0: off)
    knn_train: str = ""
    knn_val: str = ""
    knn_size: int = 0  # evaluation crop size of the monitor (0: global_size)
    knn_k: int = 20

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict | None = None, preset: str | None = None) -> "TrainConfig":
        """Read a ``.json``, ``.toml`` or ``.yaml`` file of options; ``overrides`` (not None) win."""
        return cls.build(preset, read_options(path), overrides)

    @classmethod
    def build(cls, preset: str | None = None, values: dict | None = None, overrides: dict | None = None):
        """Defaults (the method's official ones, ``METHOD_DEFAULTS``), then the ``preset``, then ``values``
        (a config file), then ``overrides`` not None."""
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        merged = {**(PRESETS[preset] if preset else {}), **(values or {})}
        merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
        method = merged.get("method", cls.method)
        return cls.from_dict({**METHOD_DEFAULTS.get(method, {}), **merged})

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        values = dict(values)
        for key in ("global_scale", "local_scale", "pred_ratio", "pred_ratio_var"):
            if key in values:
                values[key] = tuple(values[key])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.global_size % self.patch_size or self.local_size % self.patch_size:
            raise ValueError(f"crop sizes ({self.global_size}, {self.local_size}) must be multiples of the "
                             f"patch size {self.patch_size}")
        check_stem(self.stem, self.patch_size)
        if self.stem != "patch" and self.freeze_patch_embed:
            raise ValueError("freeze_patch_embed fixes the patch projection of the patch stem; the convolutional "
                             "stems have none to fix")
        if self.method == "ibot" and (self.shared_head or self.shared_head_teacher) and self.patch_out_dim != self.out_dim:
            raise ValueError(f"iBOT with shared_head or shared_head_teacher (main_ibot.py's default) scores the patch "
                             f"tokens on the CLS prototypes, so patch_out_dim must equal out_dim (got "
                             f"{self.patch_out_dim} and {self.out_dim}); set both, or shared_head_teacher false")
        if self.use_bn_in_head and self.method != "dino":
            raise ValueError("use_bn_in_head is a DINO option; the iBOT head projects every token")
        if self.method in ("dino", "ibot") and (self.freeze_patch_embed or self.queue_size or not self.mlp_bn):
            raise ValueError("freeze_patch_embed, queue_size and mlp_bn are options of "
                             f"{', '.join(METHODS[2:])}; DINO's head has use_bn_in_head")
        if self.queue_size and self.method != "mocov3":
            raise ValueError("queue_size (a MoCo v2-style queue of negatives) is a MoCo v3 option")
        if self.queue_size < 0:
            raise ValueError("queue_size must be 0 (no queue) or more")
        if self.curriculum_epochs < 0:
            raise ValueError("curriculum_epochs must be 0 (off) or more")
        if self.curriculum_epochs and not self.data.startswith("synthetic:"):
            raise ValueError("curriculum_epochs draws synthetic images; it needs data = \"synthetic:N...\"")
        if self.knn_every and not (self.knn_train and self.knn_val):
            raise ValueError("knn_every needs knn_train and knn_val (labelled folders or synthetic:N specs)")


METHODS = ("dino", "ibot", "mocov3", "simclr", "byol", "simsiam", "swav")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The backbone's first layer: the official patch projection, a convolutional stem, or that stem behind a fixed
# colour-blind edge map (``training.models.EdgeMap``).
STEMS = ("patch", "conv", "edges")


def check_stem(stem: str, patch_size: int) -> None:
    """ValueError unless ``stem`` is one of ``STEMS`` and fits ``patch_size`` (the convolutional stems halve
    the resolution per 3×3 convolution, so their patch must be a power of two, at least 4)."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if stem != "patch" and (patch_size < 4 or patch_size & (patch_size - 1)):
        raise ValueError(f"the {stem} stem needs a power-of-two patch size of at least 4, not {patch_size}")


def read_options(path: str | Path) -> dict:
    """Options from a ``.json``, ``.toml`` or ``.yaml``/``.yml`` file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a YAML config must be a mapping of option names to values")
        return values
    return json.loads(text)


# main_ibot.py's defaults where they differ from main_dino.py's (TrainConfig's): an iBOT run without a
# preset is the official script run without arguments.
METHOD_DEFAULTS: dict[str, dict] = {
    "ibot": dict(out_dim=8192, patch_out_dim=8192, local_crops_number=0, global_scale=(0.14, 1.0), batch_size=128,
                 pred_ratio=(0.3,), pred_ratio_var=(0.0,), warmup_teacher_temp_epochs=30),
}

# The official recipes, as released with the papers' checkpoints (facebookresearch/dino README and
# training logs; bytedance/ibot README). ``batch_size`` is per process: the papers ran 16 GPUs × 64 for
# ViT-S/16 (1024 images per step) and 32 GPUs × 32 for ViT-B/16; the learning rate scales with the total.
_DINO_COMMON = dict(method="dino", patch_size=16, out_dim=65536, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996, warmup_epochs=10,
                    drop_path_rate=0.1, global_size=224, local_size=96, local_crops_number=10,
                    global_scale=(0.25, 1.0), local_scale=(0.05, 0.25))
_IBOT_COMMON = dict(method="ibot", patch_size=16, out_dim=8192, patch_out_dim=8192, shared_head=True,
                    warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_patch_temp=0.04,
                    teacher_patch_temp=0.07, momentum_teacher=0.996, weight_decay=0.04, weight_decay_end=0.4,
                    clip_grad=3.0, drop_path_rate=0.1, global_size=224, local_size=96, local_crops_number=10,
                    pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2))
PRESETS: dict[str, dict] = {
    "dino_vits16": {**_DINO_COMMON, "arch": "vit_small", "epochs": 800, "batch_size": 64, "lr": 0.0005,
                    "min_lr": 1e-5, "norm_last_layer": False, "warmup_teacher_temp_epochs": 30,
                    "clip_grad": 0.0, "freeze_last_layer": 1},
    "dino_vitb16": {**_DINO_COMMON, "arch": "vit_base", "epochs": 400, "batch_size": 32, "lr": 0.00075,
                    "min_lr": 2e-6, "norm_last_layer": True, "warmup_teacher_temp_epochs": 50,
                    "clip_grad": 3.0, "freeze_last_layer": 3},
    "ibot_vits16": {**_IBOT_COMMON, "arch": "vit_small", "epochs": 800, "batch_size": 64, "lr": 0.0005,
                    "min_lr": 1e-6, "norm_last_layer": False, "warmup_teacher_temp_epochs": 30,
                    "freeze_last_layer": 1, "global_scale": (0.25, 1.0), "local_scale": (0.05, 0.25)},
    "ibot_vitb16": {**_IBOT_COMMON, "arch": "vit_base", "epochs": 400, "batch_size": 64, "lr": 0.00075,
                    "min_lr": 2e-6, "norm_last_layer": True, "warmup_teacher_temp_epochs": 50,
                    "freeze_last_layer": 3, "global_scale": (0.32, 1.0), "local_scale": (0.05, 0.32)},
}
