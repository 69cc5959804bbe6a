"""The DINO head and multi-crop wrapper behave as the official vision_transformer.py defines them."""

import torch
from torch import nn

from training.models import BackboneSpec, DINOHead, MultiCropWrapper, WeightNormLinear, build_backbone


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
