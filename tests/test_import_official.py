"""Official DINO / iBOT checkpoints, in every shape the projects release them, export to bundles whose
outputs equal an independent implementation of the official ``vision_transformer.py`` forward pass
(``official_reference.py``): embedding within 1e-4, attention within 1e-5, at 224×224 and at sizes where
the official bicubic position-embedding interpolation (``+ 0.1`` scale factor) runs."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from official_reference import ReferenceViT, dino_head_state, make_official_vit, official_args
from PIL import Image
from serving import Server
from torchvision import transforms as T

from training.checkpoint import sha256_file
from training.export import BundleGraph
from training.official_vit import official_pos_encoding
from training.weights import ImportedSpec, fit_weights, load_checkpoint

SIZES = [(2, 3, 224, 224), (1, 3, 240, 320), (1, 3, 96, 176)]
DINO_EVAL = T.Compose([
    T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(224),
    T.ToTensor(),
    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def prefixed(vit: ReferenceViT, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in vit.state_dict().items()}


@pytest.fixture(scope="module")
def teacher() -> ReferenceViT:
    return make_official_vit(seed=0)


@pytest.fixture(scope="module")
def student() -> ReferenceViT:
    return make_official_vit(seed=1)


@pytest.fixture(scope="module")
def ibot_teacher() -> ReferenceViT:
    return make_official_vit(seed=2, masked_embed=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory, teacher, student, ibot_teacher) -> dict:
    """Each released shape as a file, written from the reference ViTs' official keys."""
    folder = tmp_path_factory.mktemp("official")
    optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
                 "param_groups": [{"lr": 5e-4, "weight_decay": 0.04, "params": [0]}]}
    ibot_student = make_official_vit(seed=3, masked_embed=True)
    shapes = {
        # dino_deitsmall16_pretrain.pth: the teacher backbone, no prefix
        "dino-release": teacher.state_dict(),
        # main_dino.py checkpoint.pth: DDP-wrapped student, plain teacher, heads, pickled args
        "dino-full": {
            "student": {**prefixed(student, "module.backbone."), **dino_head_state(192, 1, "module.")},
            "teacher": {**prefixed(teacher, "backbone."), **dino_head_state(192, 2, "")},
            "optimizer": optimizer, "epoch": 100, "args": official_args(),
            "dino_loss": {"center": torch.randn(1, 64)}, "fp16_scaler": {"scale": 1024.0, "_growth_tracker": 7},
        },
        # iBOT checkpoint_teacher.pth (extract_backbone_weights.py): {"state_dict": backbone}
        "ibot-release": {"state_dict": ibot_teacher.state_dict()},
        # main_ibot.py checkpoint.pth: backbones with the mask token, heads, pickled args
        "ibot-full": {
            "student": {**prefixed(ibot_student, "module.backbone."), **dino_head_state(192, 3, "module.")},
            "teacher": {**prefixed(ibot_teacher, "backbone."), **dino_head_state(192, 4, "")},
            "optimizer": optimizer, "epoch": 800, "args": official_args(arch="vit_small", pred_ratio=[0.0, 0.3]),
            "ibot_loss": {"center": torch.randn(1, 64), "center2": torch.randn(1, 1, 64)},
        },
    }
    paths = {}
    for name, obj in shapes.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(obj, paths[name])
    return {"paths": paths, "ibot_student": ibot_student}


CASES = [  # (file, checkpoint key, reference, method, source format)
    ("dino-release", "teacher", "teacher", "dino", "state-dict"),
    ("dino-full", "teacher", "teacher", "dino", "official-full-checkpoint"),
    ("dino-full", "student", "student", "dino", "official-full-checkpoint"),
    ("ibot-release", "teacher", "ibot_teacher", "ibot", "ibot-state-dict"),
    ("ibot-full", "teacher", "ibot_teacher", "ibot", "official-full-checkpoint"),
    ("ibot-full", "student", "ibot_student", "ibot", "official-full-checkpoint"),
]


def reference_outputs(vit: ReferenceViT, x: torch.Tensor):
    with torch.no_grad():
        tokens = vit.tokens(x)
        return tokens[:, 0], vit.get_last_selfattention(x)[:, :, 0, 1:], tokens[:, 1:]


@pytest.mark.parametrize("name, key, ref, method, source_format", CASES)
def test_every_released_shape_reads_as_the_official_backbone(files, request, name, key, ref, method,
                                                             source_format):
    reference = files["ibot_student"] if ref == "ibot_student" else request.getfixturevalue(ref)
    loaded = load_checkpoint(files["paths"][name], key)
    assert loaded.spec == ImportedSpec("vit_custom", patch_size=16, embed_dim=192, depth=2, num_heads=3,
                                       img_size=224, pos_interpolation="official")
    assert (loaded.method, loaded.source_format) == (method, source_format)
    official = {k: v for k, v in reference.state_dict().items() if k != "masked_embed"}
    assert loaded.weights.keys() == official.keys()
    assert all(torch.equal(loaded.weights[k], official[k]) for k in official)

    graph = BundleGraph(fit_weights(loaded.spec, loaded.weights, name)).eval()
    generator = torch.Generator().manual_seed(0)
    for shape in SIZES:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            embedding, attention, patch_tokens = graph(x)
        want = reference_outputs(reference, x)
        assert (embedding - want[0]).abs().max() <= 1e-4
        assert (attention - want[1]).abs().max() <= 1e-5
        assert (patch_tokens - want[2]).abs().max() <= 1e-4


def test_position_embeddings_follow_the_official_scale_factor_not_the_target_size():
    """``official_pos_encoding`` against ``F.interpolate(scale_factor=(g + 0.1) / √N)`` of the reference,
    over grids smaller and larger than the stored one; timm's size-based resample is far off."""
    for side in (14, 7):
        vit = ReferenceViT(img_size=16 * side, depth=1)
        with torch.no_grad():
            vit.pos_embed.copy_(0.5 * torch.randn(vit.pos_embed.shape, generator=torch.Generator().manual_seed(side)))
        limit = 1e-5 * float(vit.pos_embed.detach().abs().max())  # float32 rounding of the cubic weights
        for rows in (1, 3, side - 1, side, side + 1, 20, 37):
            for cols in (2, side, 15, 31):
                with torch.no_grad():
                    tokens = torch.zeros(1, rows * cols + 1, vit.pos_embed.shape[-1])
                    want = vit.interpolate_pos_encoding(tokens, rows * 16, cols * 16)
                    got = official_pos_encoding(vit.pos_embed, rows, cols)
                assert got.shape == want.shape
                assert (got - want).abs().max() <= limit, (side, rows, cols)
                if (rows, cols) == (side, side):
                    assert torch.equal(got, vit.pos_embed)  # the training grid is used as stored
        with torch.no_grad():
            timm_style = F.interpolate(vit.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
                                       size=(20, 15), mode="bicubic", antialias=True)
            official = official_pos_encoding(vit.pos_embed, 20, 15)[0, 1:].reshape(20, 15, -1)
        assert (timm_style[0].permute(1, 2, 0) - official).abs().max() > 1e-2


def test_the_reciprocal_scale_equals_pytorchs_float32_of_one_over_scale_factor():
    """``10·side / (10·rows + 1)`` in float32 is bit-identical to ``float32(1 / ((rows + 0.1) / √N))``,
    the step PyTorch's bicubic kernel uses, for every grid up to 64 and every size up to 512 patches."""
    side = np.arange(1, 65, dtype=np.float64)[:, None]
    rows = np.arange(1, 513, dtype=np.float64)[None, :]
    ours = np.float32(10 * side) / np.float32(10 * rows + 1)
    pytorch = (1.0 / ((rows + 0.1) / np.sqrt(side * side))).astype(np.float32)
    assert np.array_equal(ours, pytorch)


@pytest.fixture(scope="module")
def official_bundle(files, tmp_path_factory):
    """`dinoserve export` of the official DINO full training checkpoint (teacher), through the CLI."""
    repository = tmp_path_factory.mktemp("repository")
    result = run_cli("export", str(files["paths"]["dino-full"]), "--repository", str(repository),
                     "--name", "dino-official", "--quiet")
    assert "verified 1x3x224x224" in result.stderr  # --verify is on by default and reports three sizes
    return repository / "dino-official"


@pytest.mark.slow
def test_onnx_of_the_official_checkpoint_equals_the_official_forward_pass(official_bundle, teacher):
    session = ort.InferenceSession(str(official_bundle / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for shape in SIZES:
        x = torch.randn(*shape, generator=generator)
        embedding, attention, patch_tokens = session.run(
            ["embedding", "attention", "patch_tokens"], {"pixel_values": x.numpy()})
        want = [t.numpy() for t in reference_outputs(teacher, x)]
        assert embedding.shape == want[0].shape and attention.shape == want[1].shape
        assert np.abs(embedding - want[0]).max() <= 1e-4
        assert np.abs(attention - want[1]).max() <= 1e-5
        assert np.abs(patch_tokens - want[2]).max() <= 1e-4


@pytest.mark.slow
def test_official_bundle_card_records_the_interpolation_and_the_source(official_bundle, files):
    card = json.loads((official_bundle / "dinoserve.json").read_text())
    assert card["method"] == "dino"
    assert (card["patch_size"], card["embed_dim"], card["num_heads"], card["depth"]) == (16, 192, 3, 2)
    assert card["pos_embed"] == {"grid": [14, 14], "interpolation": "official"}
    assert card["num_prefix_tokens"] == 1
    assert card["source"] == {"checkpoint": "dino-full.pth", "sha256": sha256_file(files["paths"]["dino-full"]),
                              "format": "official-full-checkpoint", "checkpoint_key": "teacher"}
    assert card["onnx"]["opset"] >= 18 and card["onnx"]["exporter"].startswith("torch.onnx dynamo")
    assert 'platform: "onnxruntime_onnx"' in (official_bundle / "config.pbtxt").read_text()


def test_timm_interpolation_on_official_weights_would_fail_these_tolerances(files, teacher):
    """The tolerances above can fail: the same weights with timm's resample miss the official outputs."""
    loaded = load_checkpoint(files["paths"]["dino-release"])
    graph = BundleGraph(fit_weights(replace(loaded.spec, pos_interpolation="timm"), loaded.weights, "x")).eval()
    x = torch.randn(1, 3, 240, 320, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embedding = graph(x)[0]
    assert (embedding - reference_outputs(teacher, x)[0]).abs().max() > 1e-2


@pytest.mark.slow
def test_served_official_bundle_returns_the_official_pipelines_embedding(official_bundle, teacher, tmp_path):
    from training.data import make_sample

    buf = io.BytesIO()
    make_sample(7, size=(320, 240)).image.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    server = Server(official_bundle, tmp_path / "serve.log")
    try:
        server.wait_ready()
        response = httpx.post(f"{server.url}/v1/embeddings", timeout=60,
                              files=[("images", ("photo.jpg", jpeg, "image/jpeg"))])
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    served = np.array(response.json()["data"][0]["embedding"], dtype=np.float64)
    with torch.no_grad():
        official = teacher(DINO_EVAL(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None])[0].double().numpy()
    cosine = served @ official / (np.linalg.norm(served) * np.linalg.norm(official))
    assert cosine >= 0.999
    assert math.isclose(np.linalg.norm(served), np.linalg.norm(official), rel_tol=1e-2)
