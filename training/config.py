"""Training configuration: every hyper-parameter with its default and why (torch-free, so the
command line can be built without importing torch)."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class TrainConfig:
    """Hyper-parameters, defaults from the paper's ViT-S/16 recipe (``main_dino.py``)."""

    data: str = ""
    output: str = "runs/dino"
    method: str = "dino"
    arch: str = "vit_small"
    patch_size: int = 16
    img_size: int = 224  # size of the position-embedding grid (× patch); other sizes are interpolated
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
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04  # values above 0.07 were unstable in the paper
    warmup_teacher_temp_epochs: int = 30
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
    num_workers: int = 2
    seed: int = 0

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        """Read a ``.json`` or ``.toml`` file of options; ``overrides`` (not None) win."""
        path = Path(path)
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.from_dict({**values, **{k: v for k, v in (overrides or {}).items() if v is not None}})

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        values = dict(values)
        for key in ("global_scale", "local_scale"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)
