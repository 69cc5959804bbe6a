"""The committed demo checkpoint is what the README says: the teacher backbone of a `dinoserve train`
run with demo/train.toml, loadable for export."""

import hashlib
import json
import tomllib
from pathlib import Path

import torch

from training.config import TrainConfig
from training.export import load_backbone
from training.models import build_backbone

ROOT = Path(__file__).resolve().parent.parent


def test_demo_checkpoint_is_the_teacher_backbone_of_the_documented_recipe():
    recipe = tomllib.loads((ROOT / "demo" / "train.toml").read_text())
    spec, method, weights = load_backbone(ROOT / "demo" / "dinoserve-demo.pth")
    assert (method, spec.arch, spec.patch_size, spec.img_size) == (
        recipe["method"], recipe["arch"], recipe["patch_size"], recipe["img_size"])
    model = build_backbone(spec)
    model.load_state_dict(weights)  # strict: every key present, none extra
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, spec.embed_dim)
    assert (ROOT / "demo" / "dinoserve-demo.pth").stat().st_size < 25 * 1024 * 1024


def test_committed_demo_bundle_was_exported_from_the_committed_checkpoint():
    bundle = ROOT / "demo" / "model_repository" / "dinoserve-demo"
    card = json.loads((bundle / "dinoserve.json").read_text())
    digest = hashlib.sha256((ROOT / "demo" / "dinoserve-demo.pth").read_bytes()).hexdigest()
    assert card["source"]["sha256"] == digest
    assert card["name"] == "dinoserve-demo" and (bundle / "1" / "model.onnx").is_file()


def test_probe_recipe_of_the_training_docs_is_a_valid_config():
    cfg = TrainConfig.from_file(ROOT / "demo" / "probe.toml")
    assert (cfg.method, cfg.arch, cfg.patch_size, cfg.stem, cfg.global_size, cfg.local_size) == (
        "dino", "vit_micro", 8, "conv", 64, 32)
    assert cfg.knn_every == 1 and cfg.knn_val.endswith(":test")  # the monitor on held-out backgrounds
