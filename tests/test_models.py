"""The DINO head and multi-crop wrapper behave as the official vision_transformer.py defines them; the
convolutional stems (``--stem conv``, ``--stem edges``) keep the token grid, the checkpoints and the exported
bundle of the patch stem, and the edge map is the same for a shape in any colours."""

from dataclasses import asdict

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.models import (
    BackboneSpec,
    DINOHead,
    MultiCropWrapper,
    WeightNormLinear,
    EdgeMap,
    build_backbone,
    conv_stem,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def test_weight_norm_linear_matches_torch_weight_norm_and_official_keys():
    torch.manual_seed(0)
    ours = WeightNormLinear(8, 5)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    reference = nn.utils.parametrizations.weight_norm(nn.Linear(8, 5, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(ours.weight_g)
        reference.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), reference(x))
    assert set(ours.state_dict()) == {"weight_g", "weight_v"}


def test_dino_head_normalises_the_bottleneck_and_freezes_the_gain_when_asked():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    assert head.last_layer.weight_g.requires_grad is False
    assert DINOHead(16, 32, 24, 8, norm_last_layer=False).last_layer.weight_g.requires_grad is True
    x = torch.randn(4, 16)
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    # With the gain at 1 every prototype has unit norm, so logits are cosines in [-1, 1].
    assert head(x).shape == (4, 32)
    assert head(x).abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(head(x), head.last_layer(bottleneck))


def test_multicrop_wrapper_runs_each_resolution_once_in_crop_major_order():
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSpec.from_arch("vit_nano", img_size=32)).eval()
    head = DINOHead(96, 10, hidden_dim=16, bottleneck_dim=8)
    wrapper = MultiCropWrapper(backbone, head).eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        got = wrapper(crops)
        expected = torch.cat([head(backbone(c)) for c in crops])
    assert got.shape == (6, 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- the convolutional stem (issue 20): a backbone option the bundle contract does not see -------------------


@pytest.mark.parametrize("stem", ["conv", "edges"])
@pytest.mark.parametrize("patch, sizes", [(4, [(32, 32), (24, 40), (12, 4)]), (8, [(64, 64), (32, 48), (72, 16)]),
                                          (16, [(64, 48), (16, 16)])])
def test_conv_stem_keeps_the_token_grid_of_the_patch_stem(stem, patch, sizes):
    torch.manual_seed(0)
    patch_vit = build_backbone(BackboneSpec.from_arch("vit_pico", patch, img_size=4 * patch)).eval()
    conv_vit = build_backbone(BackboneSpec.from_arch("vit_pico", patch, img_size=4 * patch, stem=stem)).eval()
    assert isinstance(conv_vit.patch_embed.proj, nn.Sequential)
    for height, width in sizes:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            tokens, reference = conv_vit.forward_tokens(x), patch_vit.forward_tokens(x)
        assert tokens.shape == reference.shape == (2, 1 + (height // patch) * (width // patch), 48)
        assert conv_vit(x).shape == (2, 48)


def test_conv_stem_layers_and_initialisation_follow_xiao_et_al():
    stem = conv_stem(8, 192)
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (3, 24, 3, 2), (24, 48, 3, 2), (48, 96, 3, 2), (96, 192, 1, 1)]
    assert [c.bias is None for c in convs] == [True, True, True, False]  # BatchNorm follows the 3×3 ones
    for bn in (m for m in stem if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    for patch in (2, 6, 12):
        for stem in ("conv", "edges"):
            with pytest.raises(ValueError, match=f"the {stem} stem needs a power-of-two patch size of at least 4"):
                BackboneSpec.from_arch("vit_pico", patch, stem=stem)
    with pytest.raises(ValueError, match="unknown stem"):
        BackboneSpec.from_arch("vit_pico", 8, stem="hybrid")
    with pytest.raises(ValueError, match="power-of-two"):
        TrainConfig.from_dict({"patch_size": 12, "global_size": 48, "local_size": 24, "stem": "conv"})
    with pytest.raises(ValueError, match="unknown stem"):
        TrainConfig.from_dict({"stem": "hybrid"})
    with pytest.raises(ValueError, match="freeze_patch_embed"):  # MoCo v3's fixed projection is the patch stem's
        TrainConfig.from_dict({"method": "mocov3", "stem": "conv", "freeze_patch_embed": True})


def test_the_stem_round_trips_through_training_checkpoints_and_old_ones_load_as_patch(tmp_path):
    from training.checkpoint import BACKBONE_FORMAT, FORMAT_VERSION
    from training.trainer import train
    from training.weights import fit_weights, load_checkpoint

    cfg = TrainConfig.from_dict({
        "data": "synthetic:16:32:0", "output": str(tmp_path / "run"), "arch": "vit_pico", "patch_size": 8,
        "img_size": 32, "stem": "conv", "epochs": 1, "batch_size": 8, "global_size": 32, "local_size": 16,
        "local_crops_number": 1, "out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_epochs": 0,
        "num_workers": 0, "tensorboard": False})
    run = train(cfg, progress=False)
    for name, key in (("checkpoint.pth", "teacher"), ("checkpoint.pth", "student"), ("teacher_backbone.pth", "teacher")):
        loaded = load_checkpoint(run / name, key)
        assert loaded.spec == BackboneSpec.from_arch("vit_pico", 8, 32, stem="conv")
        vit = fit_weights(loaded.spec, loaded.weights, name)  # conv, BatchNorm and running statistics all fit
        assert isinstance(vit.patch_embed.proj, nn.Sequential)
        assert not torch.equal(vit.patch_embed.proj[1].running_var, torch.ones(24))  # updated by training
    with pytest.raises(ValueError, match="conv stem; this run has --stem patch"):  # resume refuses another stem
        train(TrainConfig.from_dict({**asdict(cfg), "stem": "patch", "epochs": 2}), progress=False)

    # A backbone file written before the field existed (no "stem") is a patch-stem one.
    spec = BackboneSpec.from_arch("vit_pico", 8, 32)
    old = {k: v for k, v in spec.to_dict().items() if k != "stem"}
    torch.save({"format": BACKBONE_FORMAT, "version": FORMAT_VERSION, "method": "dino", "backbone": old,
                "state_dict": build_backbone(spec).state_dict()}, tmp_path / "old.pth")
    loaded = load_checkpoint(tmp_path / "old.pth")
    assert loaded.spec.stem == "patch" and loaded.spec == spec
    fit_weights(loaded.spec, loaded.weights, "old.pth")


@pytest.mark.parametrize("stem", ["conv", "edges"])
def test_exported_conv_stem_backbone_matches_pytorch_with_running_statistics(tmp_path, stem):
    from training.export import BundleGraph, export_onnx, verify_onnx

    torch.manual_seed(0)
    spec = BackboneSpec.from_arch("vit_pico", 4, img_size=32, stem=stem)
    vit = build_backbone(spec)
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), as after training; export runs eval mode
        for _ in range(3):
            vit.forward_tokens(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    graph = BundleGraph(vit).eval()  # as export_bundle
    export_onnx(graph, spec, tmp_path / "model.onnx")
    report = verify_onnx(graph, tmp_path / "model.onnx", spec)  # raises beyond 1e-4 at three sizes
    assert [shape for shape, _ in report] == [(1, 3, 32, 32), (2, 3, 36, 48), (1, 3, 60, 80)]
    embedding, attention, patch_tokens = graph(torch.randn(2, 3, 36, 48))
    assert embedding.shape == (2, 48) and attention.shape == (2, 3, 9 * 12) and patch_tokens.shape == (2, 108, 48)


# -- the edge stem (``--stem edges``): the conv stem fed a colour-blind edge map -------------------------------


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    """(h, w, 3) RGB values in 0..255 → the network's (1, 3, h, w) input, ImageNet-normalised."""
    return ((pixels.permute(2, 0, 1) / 255 - IMAGENET_MEAN) / IMAGENET_STD)[None]


def test_edge_map_of_a_step_is_four_times_its_height_over_the_mean_plus_the_floor():
    # Sobel's x kernel weighs the columns either side of a pixel 1, 2, 1: at both pixels beside a vertical
    # step of height h it gives 4h, elsewhere 0; here the step is in one normalised channel only.
    x = torch.zeros(1, 3, 8, 10)
    x[0, 1, :, 5:] = 0.75
    out = EdgeMap(floor=0.5)(x)[0]
    magnitude = 4 * 0.75
    # Two of ten columns carry the edge; the others have the magnitude of the 1e-6 each square root adds.
    scale = (2 * magnitude + 8 * (2e-6) ** 0.5) / 10 + 0.5
    assert torch.allclose(out[0, :, 4:6], torch.full((8, 2), magnitude / scale), rtol=1e-3)  # |∂x|
    assert torch.allclose(out[2, :, 4:6], torch.full((8, 2), magnitude / scale), rtol=1e-3)  # magnitude
    assert out[1].max() < 1e-2 and out[:, :, :4].max() < 1e-2 and out[:, :, 6:].max() < 1e-2  # no |∂y|, no edge


def test_edge_map_is_the_same_for_a_shape_in_any_colours_up_to_one_scale():
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    inside = (((xs - 20) ** 2 + (ys - 26) ** 2) < 14 ** 2) | ((xs > 28) & (xs < 44) & (ys > 6) & (ys < 22))
    colourings = [((255, 255, 255), (0, 0, 0)), ((0, 0, 0), (255, 255, 255)),  # either polarity
                  ((200, 40, 90), (30, 160, 120)), ((90, 90, 250), (240, 220, 30))]
    inputs, maps = [], []
    for shape_rgb, background_rgb in colourings:
        pixels = torch.where(inside[..., None], torch.tensor(shape_rgb, dtype=torch.float32),
                             torch.tensor(background_rgb, dtype=torch.float32))
        inputs.append(_normalised(pixels).flatten())
        maps.append(EdgeMap()(_normalised(pixels)).flatten())
    for i in range(1, len(colourings)):
        assert torch.cosine_similarity(maps[0], maps[i], dim=0) > 0.9999  # one map up to its scale
        assert torch.cosine_similarity(inputs[0], inputs[i], dim=0) < 0.9  # the colours themselves differ
    flat = _normalised(torch.full((48, 48, 3), 120.0))
    assert EdgeMap()(flat).abs().max() < 1e-2  # no edges, nothing amplified


def test_edge_stem_has_the_conv_stems_weights_and_no_more():
    torch.manual_seed(0)
    conv = build_backbone(BackboneSpec.from_arch("vit_pico", 8, img_size=32, stem="conv"))
    torch.manual_seed(0)
    edges = build_backbone(BackboneSpec.from_arch("vit_pico", 8, img_size=32, stem="edges"))
    assert isinstance(edges.patch_embed.proj[0], EdgeMap)
    conv_state, edge_state = conv.state_dict(), edges.state_dict()
    assert len(conv_state) == len(edge_state)
    for (name, weight), (edge_name, edge_weight) in zip(conv_state.items(), edge_state.items()):
        if name.startswith("patch_embed.proj."):  # the same layers, numbered from 1 behind the edge map
            index, rest = name.removeprefix("patch_embed.proj.").split(".", 1)
            name = f"patch_embed.proj.{int(index) + 1}.{rest}"
        assert edge_name == name and torch.equal(weight, edge_weight)
