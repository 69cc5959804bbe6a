"""Checkpoint files written by ``dinoserve train`` and read by ``dinoserve export``.

Two kinds, both plain ``torch.save`` dicts of tensors and builtins (loadable with ``weights_only=True``):

- ``checkpoint.pth``: everything to resume, in the official full-checkpoint layout of ``main_dino.py`` /
  ``main_ibot.py`` (``student`` with ``module.backbone.`` / ``module.head.`` keys, ``teacher``,
  ``optimizer``, ``dino_loss`` / ``ibot_loss``, ``epoch``, ``fp16_scaler``; ``Trainer.official_checkpoint``)
  plus our own keys (``format``, ``method``, ``backbone``, ``config``, ...);
- ``teacher_backbone.pth``: the teacher backbone alone, what serving needs (``state_dict`` without prefix).

Both carry ``format`` and the ``backbone`` spec so export can rebuild the architecture without guessing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

FULL_FORMAT = "dinoserve-checkpoint"
BACKBONE_FORMAT = "dinoserve-backbone"
FORMAT_VERSION = 1


def backbone_file(spec: dict, method: str, state_dict: dict) -> dict:
    """The served-backbone file (``teacher_backbone.pth``, ``backbone.pth``): the backbone spec (stochastic
    depth off: serving never drops paths), the method that trained it and its weights."""
    return {"format": BACKBONE_FORMAT, "version": FORMAT_VERSION, "method": method,
            "backbone": {**spec, "drop_path_rate": 0.0}, "state_dict": state_dict}


def atomic_save(obj: dict, path: Path) -> None:
    """Write to a temporary file and rename, so a crash mid-write never leaves a torn checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Keys that start with ``prefix``, with it removed; other keys dropped."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
