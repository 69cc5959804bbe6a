"""The model card ``dinoserve.json``: the one place both sides read shared constants from.

Written by ``dinoserve export`` next to the ONNX file (the bundle's contract: docs/bundle.md), read by the
gateway for preprocessing, output names and what ``GET /v1/models`` shows. Plain JSON so the torch-free
gateway can read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CARD_FILENAME = "dinoserve.json"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_NAMES = ("embedding", "attention", "patch_tokens")
INPUT_NAME = "pixel_values"
REQUIRED_FIELDS = (
    "format_version", "name", "method", "arch", "patch_size", "embed_dim", "num_heads",
    "preprocess", "segmentation", "inputs", "outputs", "source",
)


def model_versions(model_dir: str | Path) -> list[int]:
    """The numeric version folders of a bundle that hold a model file, oldest first."""
    found = []
    for entry in Path(model_dir).iterdir() if Path(model_dir).is_dir() else ():
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0 and (
                (entry / "model.onnx").is_file() or (entry / "model.plan").is_file()):
            found.append(int(entry.name))
    return sorted(found)


def latest_model_file(model_dir: str | Path, filename: str = "model.onnx") -> Path:
    """``<model_dir>/<newest version>/<filename>``: the file Triton's default version policy serves."""
    versions = [v for v in model_versions(model_dir) if (Path(model_dir) / str(v) / filename).is_file()]
    if not versions:
        raise FileNotFoundError(f"no version folder with {filename} in {model_dir}")
    return Path(model_dir) / str(versions[-1]) / filename


@dataclass(frozen=True)
class Preprocess:
    """DINO's evaluation transform: shorter side to ``resize``, centre crop ``crop``, normalise."""

    resize: int = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class ModelCard:
    name: str
    method: str
    arch: str
    patch_size: int
    embed_dim: int
    num_heads: int
    preprocess: Preprocess
    segmentation_size: int
    raw: dict

    @property
    def input_name(self) -> str:
        return self.raw["inputs"]["pixel_values"]["name"]

    def output_name(self, role: str) -> str:
        return self.raw["outputs"][role]["name"]

    @classmethod
    def from_dict(cls, card: dict) -> "ModelCard":
        missing = [k for k in REQUIRED_FIELDS if k not in card]
        if missing:
            raise ValueError(f"model card is missing fields: {', '.join(missing)}")
        if card["format_version"] > FORMAT_VERSION:
            raise ValueError(
                f"model card format {card['format_version']} is newer than this gateway "
                f"understands ({FORMAT_VERSION}); upgrade dinoserve"
            )
        pre = card["preprocess"]
        return cls(
            name=card["name"],
            method=card["method"],
            arch=card["arch"],
            patch_size=int(card["patch_size"]),
            embed_dim=int(card["embed_dim"]),
            num_heads=int(card["num_heads"]),
            preprocess=Preprocess(
                resize=int(pre["resize"]),
                crop=int(pre["crop"]),
                interpolation=pre["interpolation"],
                mean=tuple(pre["mean"]),
                std=tuple(pre["std"]),
            ),
            segmentation_size=int(card["segmentation"]["size"]),
            raw=card,
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelCard":
        path = Path(model_dir) / CARD_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no model card at {path}: is {Path(model_dir)} a bundle written by `dinoserve export`?"
            )
        return cls.from_dict(json.loads(path.read_text()))
