"""``dinoserve export`` writes the bundle of docs/bundle.md whose ONNX outputs equal the PyTorch
backbone: embedding = final-norm CLS, attention = last block's CLS→patch softmax attention, patch tokens."""

import json
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.checkpoint import sha256_file
from training.export import load_backbone
from training.models import BackboneSpec, build_backbone


@pytest.fixture(scope="module")
def reference(trained_run):
    spec, _, weights = load_backbone(trained_run / "checkpoint.pth", "teacher")
    vit = build_backbone(spec)
    vit.load_state_dict(weights)
    return vit.eval()


@pytest.fixture(scope="module")
def session(bundle):
    return ort.InferenceSession(str(bundle / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def last_self_attention(vit, x):
    """Official ``get_last_selfattention(x)[:, :, 0, 1:]``, recomputed from the last block's weights."""
    captured = {}
    handle = vit.blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        vit(x)
    handle.remove()
    tokens = captured["x"].numpy().astype(np.float64)
    attn_mod = vit.blocks[-1].attn
    w, b = attn_mod.qkv.weight.detach().numpy(), attn_mod.qkv.bias.detach().numpy()
    qkv = tokens @ w.T + b
    B, N, _ = qkv.shape
    heads, hd = attn_mod.num_heads, attn_mod.head_dim
    q, k, _ = qkv.reshape(B, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return attn[:, :, 0, 1:]


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (3, 3, 240, 320), (2, 3, 64, 48)])
def test_onnx_outputs_equal_the_pytorch_backbone(reference, session, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    embedding, attention, patch_tokens = session.run(
        ["embedding", "attention", "patch_tokens"], {"pixel_values": x.numpy()}
    )
    with torch.no_grad():
        cls = reference(x).numpy()
        tokens = reference.forward_features(x)[:, 1:].numpy()
    grid = (shape[2] // 16) * (shape[3] // 16)
    assert embedding.shape == (shape[0], 96)
    assert attention.shape == (shape[0], 2, grid)
    assert patch_tokens.shape == (shape[0], grid, 96)
    np.testing.assert_allclose(embedding, cls, atol=1e-4)
    np.testing.assert_allclose(patch_tokens, tokens, atol=1e-4)
    np.testing.assert_allclose(attention, last_self_attention(reference, x), atol=1e-5)
    # CLS→patch attention excludes CLS→CLS, so each head's row sums to less than one.
    assert np.all(attention.sum(-1) < 1.0) and np.all(attention >= 0)


def test_bundle_files_follow_the_contract(bundle, trained_run):
    assert (bundle / "1" / "model.onnx").is_file()
    config = (bundle / "config.pbtxt").read_text()
    assert 'name: "tiny"' in config and 'platform: "onnxruntime_onnx"' in config
    assert "dynamic_batching" in config and "max_batch_size: 64" in config
    assert 'name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, -1, -1 ]' in config

    card = json.loads((bundle / "dinoserve.json").read_text())
    assert card["format_version"] == 1 and card["name"] == "tiny" and card["method"] == "dino"
    assert (card["arch"], card["patch_size"], card["embed_dim"], card["num_heads"]) == ("vit_nano", 16, 96, 2)
    assert card["preprocess"] == {"resize": 256, "crop": 224, "interpolation": "bicubic",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert card["segmentation"]["size"] == 480
    assert {k: v["name"] for k, v in card["outputs"].items()} == {
        "embedding": "embedding", "attention": "attention", "patch_tokens": "patch_tokens"}
    assert card["inputs"]["pixel_values"]["name"] == "pixel_values"
    assert card["source"]["sha256"] == sha256_file(trained_run / "checkpoint.pth")
    assert card["source"]["checkpoint_key"] == "teacher" and card["source"]["format"] == "dinoserve-checkpoint"
    # Trained with the official interpolation, served with it: one rule everywhere.
    assert card["pos_embed"] == {"grid": [14, 14], "interpolation": "official"}


def test_onnx_graph_has_dynamic_batch_height_and_width(session):
    (inp,) = session.get_inputs()
    assert inp.name == "pixel_values"
    assert all(isinstance(d, str) for d in (inp.shape[0], inp.shape[2], inp.shape[3]))


def test_student_and_teacher_weights_differ_and_export_picks_the_requested_one(trained_run):
    _, _, teacher = load_backbone(trained_run / "checkpoint.pth", "teacher")
    _, _, student = load_backbone(trained_run / "checkpoint.pth", "student")
    _, _, slim = load_backbone(trained_run / "teacher_backbone.pth")
    assert teacher.keys() == student.keys() == slim.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    assert all(torch.equal(teacher[k], slim[k]) for k in teacher)


def test_export_refuses_a_file_that_holds_no_vit(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not hold a ViT backbone: missing patch_embed.proj.weight"):
        load_backbone(path)


def test_triton_config_parses_as_triton_model_config_with_a_bounded_queue_and_warmup(bundle):
    """Parsed with Triton's own ModelConfig protobuf schema (shipped in tritonclient): a typo or an
    unknown field fails here as it would in tritonserver."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((bundle / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 64
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 256
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.version_policy.latest.num_versions == 1
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_AUTO, 1)]
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1
    assert list(warmup.inputs["pixel_values"].dims) == [3, 224, 224] and warmup.inputs["pixel_values"].zero_data
    assert [o.name for o in config.output] == ["embedding", "attention", "patch_tokens"]


def test_a_new_export_rolls_out_as_the_next_version_and_the_newest_is_served(trained_run, tmp_path):
    from core.model_card import latest_model_file, model_versions
    from training.export import ExportOptions, export_bundle

    repository = tmp_path / "repository"
    quick = ExportOptions(verify=False, progress=False)
    export_bundle(trained_run / "checkpoint.pth", repository, "tiny", quick)
    first = (repository / "tiny" / "1" / "model.onnx").read_bytes()
    model_dir = export_bundle(trained_run / "checkpoint.pth", repository, "tiny",
                              ExportOptions(checkpoint_key="student", verify=False, progress=False))
    assert model_versions(model_dir) == [1, 2]
    assert (model_dir / "1" / "model.onnx").read_bytes() == first  # the old version is left in place
    assert latest_model_file(model_dir) == model_dir / "2" / "model.onnx"
    card = json.loads((model_dir / "dinoserve.json").read_text())
    assert card["version"] == 2 and card["source"]["checkpoint_key"] == "student"

    export_bundle(trained_run / "checkpoint.pth", repository, "tiny", replace(quick, version=1))
    assert model_versions(model_dir) == [1, 2]  # an explicit version is overwritten, not added


def test_another_architecture_is_refused_next_to_existing_versions(trained_run, tmp_path):
    from training.export import ExportOptions, export_bundle
    from training.weights import CheckpointError

    repository = tmp_path / "repository"
    quick = ExportOptions(verify=False, progress=False)
    model_dir = export_bundle(trained_run / "checkpoint.pth", repository, "tiny", quick)
    other = tmp_path / "wider.pth"
    spec = BackboneSpec.from_arch("vit_micro", 16, 224)
    torch.save(build_backbone(spec).state_dict(), other)
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    with pytest.raises(CheckpointError, match="width 96, 2 heads; this checkpoint is patch 16, width 192, 3 heads"):
        export_bundle(other, repository, "tiny", quick)
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before
    assert json.loads((model_dir / "dinoserve.json").read_text())["embed_dim"] == 96


def test_fp16_variant_keeps_fp32_inputs_and_outputs_and_the_embedding_direction(trained_run, reference, tmp_path):
    from training.export import ExportOptions, export_bundle

    model_dir = export_bundle(trained_run / "checkpoint.pth", tmp_path / "repository", "tiny16",
                              ExportOptions(precision="fp16", progress=False))  # verify: cosine >= 0.999 at 3 sizes
    onnx_path = model_dir / "1" / "model.onnx"
    assert json.loads((model_dir / "dinoserve.json").read_text())["precision"] == "fp16"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    assert all(o.type == "tensor(float)" for o in session.get_outputs())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    embedding = session.run(["embedding"], {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        want = reference(x).numpy()
    cosine = (embedding * want).sum(-1) / (np.linalg.norm(embedding, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() >= 0.999 and np.abs(embedding - want).max() > 0  # fp16 arithmetic, not a copy of fp32
    import onnx

    weights = onnx.load(str(onnx_path)).graph.initializer
    assert sum(w.data_type == onnx.TensorProto.FLOAT16 for w in weights) > len(weights) // 2


def test_a_model_trained_on_small_crops_is_carded_at_its_own_scale(trained_run, tmp_path):
    """``crop`` sets the card's embedding transform (resize at DINO's 256 : 224 ratio unless given), the default
    segmentation input and Triton's warm-up input; bad values are refused before anything is written."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from core.model_card import ModelCard
    from training.export import ExportOptions, export_bundle
    from training.weights import CheckpointError

    model_dir = export_bundle(trained_run / "checkpoint.pth", tmp_path / "repository", "small",
                              ExportOptions(crop=64, segmentation_size=96, verify=False, progress=False))
    card = ModelCard.load(model_dir)
    assert (card.preprocess.resize, card.preprocess.crop, card.segmentation_size) == (73, 64, 96)  # 64 x 8/7
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert list(config.model_warmup[0].inputs["pixel_values"].dims) == [3, 64, 64]
    assert ExportOptions(crop=64, resize=80).resize == 80
    for bad in ({"crop": 0}, {"crop": 100, "resize": 90}, {"segmentation_size": 2000}):
        with pytest.raises(CheckpointError):
            ExportOptions(**bad)
