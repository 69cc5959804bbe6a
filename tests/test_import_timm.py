"""timm ViT weights (``.safetensors`` or ``.pth``) export with timm's own numerics: register tokens, layer
scale and position embeddings without a CLS entry are read from the keys, and the position embeddings
keep timm's resample. The reference is the timm model the weights came from."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from training.export import BundleGraph
from training.weights import ImportedSpec, fit_weights, load_checkpoint, remap_keys


def timm_vit(seed: int, **layout) -> VisionTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3,
                                dynamic_img_size=True, **layout)
        with torch.no_grad():
            for name, param in vit.named_parameters():
                if name in ("pos_embed", "cls_token", "reg_token") or name.endswith(".gamma"):
                    param.copy_(0.5 * torch.randn(param.shape))
    return vit.eval()


def timm_reference(vit: VisionTransformer, x: torch.Tensor):
    """(final-norm CLS, last block's CLS→patch attention, final-norm patch tokens) from timm's modules."""
    captured = {}
    handle = vit.blocks[-1].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        tokens = vit.forward_features(x)
        handle.remove()
        attn = vit.blocks[-1].attn
        B, N, C = captured["x"].shape
        qkv = attn.qkv(vit.blocks[-1].norm1(captured["x"])).reshape(B, N, 3, attn.num_heads, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        weights = (q @ k.transpose(-2, -1) * attn.head_dim ** -0.5).softmax(-1)
    prefix = vit.num_prefix_tokens
    return tokens[:, 0], weights[:, :, 0, prefix:], tokens[:, prefix:]


LAYOUTS = {
    "registers+layer-scale": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5, num_classes=0),
    "classifier": dict(num_classes=10, global_pool="token"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_export_with_timms_numerics(tmp_path, layout, suffix):
    vit = timm_vit(0, **LAYOUTS[layout])
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    loaded = load_checkpoint(path)
    registers = LAYOUTS[layout].get("reg_tokens", 0)
    assert loaded.spec == ImportedSpec("vit_custom", 16, 192, 2, 3, img_size=224, reg_tokens=registers,
                                       no_embed_class=registers > 0, layer_scale=registers > 0,
                                       pos_interpolation="timm")
    assert loaded.method == "unknown" and "head.weight" not in loaded.weights
    graph = BundleGraph(fit_weights(loaded.spec, loaded.weights, path.name)).eval()
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 224, 224), (1, 3, 240, 320)]:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            got = graph(x)
        want = timm_reference(vit, x)
        grid = (shape[2] // 16) * (shape[3] // 16)
        assert got[1].shape == (shape[0], 3, grid) and got[2].shape == (shape[0], grid, 192)
        assert (got[0] - want[0]).abs().max() <= 1e-4
        assert (got[1] - want[1]).abs().max() <= 1e-5
        assert (got[2] - want[2]).abs().max() <= 1e-4


def test_ibot_layer_scale_and_wrapper_prefixes_map_to_timm_keys():
    gain, weight = torch.ones(4), torch.zeros(4, 4)
    assert remap_keys({
        "module.backbone.blocks.3.gamma_1": gain, "module.backbone.blocks.3.gamma_2": gain,
        "module.backbone.blocks.3.attn.qkv.weight": weight, "module.backbone.masked_embed": gain,
        "module.head.last_layer.weight_g": gain,
    }) == {"blocks.3.ls1.gamma": gain, "blocks.3.ls2.gamma": gain, "blocks.3.attn.qkv.weight": weight}
