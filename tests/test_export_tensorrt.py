"""``dinoserve export --format tensorrt`` on a machine with TensorRT and an NVIDIA GPU: an FP16 engine in a
``tensorrt_plan`` bundle whose ``embedding`` keeps cosine ≥ 0.999 to the FP32 graph (checked by export's
own verification). Skipped, with the reason, where TensorRT or the GPU is missing."""

from __future__ import annotations

import json

import pytest
import torch
from official_reference import make_official_vit

from training.export import ExportOptions, Serving, export_bundle, tensorrt_unavailable

pytestmark = pytest.mark.skipif(tensorrt_unavailable() is not None,
                                reason=f"TensorRT engine export: {tensorrt_unavailable()}")


def test_tensorrt_bundle_of_an_official_checkpoint(tmp_path):
    checkpoint = tmp_path / "dino_release.pth"
    torch.save(make_official_vit(seed=0).state_dict(), checkpoint)
    model_dir = export_bundle(checkpoint, tmp_path / "repository", "dino-trt",
                              ExportOptions(format="tensorrt", serving=Serving(max_batch_size=8), progress=False))
    assert (model_dir / "1" / "model.plan").stat().st_size > 0
    assert not (model_dir / "1" / "model.onnx").exists()
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 8" in config
    card = json.loads((model_dir / "dinoserve.json").read_text())
    assert card["runtime"]["format"] == "tensorrt" and card["precision"] == "fp16"
