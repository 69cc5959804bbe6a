"""``dinoserve export``: checkpoint → Triton model-repository entry (DESIGN.md, contract 1).

Writes ``<repository>/<name>/1/model.onnx``, ``config.pbtxt`` and the model card ``dinoserve.json``. The
ONNX graph maps ``pixel_values [B, 3, H, W]`` to ``embedding`` (final-norm CLS), ``attention`` (the
last block's CLS→patch attention per head) and ``patch_tokens``, with B, H and W dynamic and the
position embeddings interpolated inside the graph.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from service import __version__
from service.model_card import (
    CARD_FILENAME, FORMAT_VERSION, IMAGENET_MEAN, IMAGENET_STD, INPUT_NAME, OUTPUT_NAMES,
)

from .checkpoint import BACKBONE_FORMAT, FULL_FORMAT, sha256_file, strip_prefix
from .models import BackboneSpec, build_backbone

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
DEFAULT_QUEUE_DELAY_US = 2000


def block_with_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm ``Block`` computing its softmax attention explicitly (timm's fused SDPA hides it).

    Same arithmetic as timm's unfused ``Attention.forward``; returns the block output and the attention
    probabilities ``[B, heads, N, N]``.
    """
    attn_mod = block.attn
    y = block.norm1(x)
    B, N, _ = y.shape
    qkv = attn_mod.qkv(y).reshape(B, N, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    attn = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, attn_mod.attn_dim)
    out = attn_mod.proj(attn_mod.norm(out))
    x = x + block.drop_path1(block.ls1(out))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, attn


class BundleGraph(nn.Module):
    """The exported function: ``pixel_values`` → (``embedding``, ``attention``, ``patch_tokens``)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: torch.Tensor):
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values))))
        for block in vit.blocks[:-1]:
            x = block(x)
        x, attn = block_with_attention(vit.blocks[-1], x)
        x = vit.norm(x)
        prefix = vit.num_prefix_tokens
        return x[:, 0], attn[:, :, 0, prefix:], x[:, prefix:]


def load_backbone(path: Path, checkpoint_key: str = "teacher") -> tuple[BackboneSpec, str, dict]:
    """Read one of our checkpoints: (backbone spec, method, backbone state dict without prefixes)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt == BACKBONE_FORMAT:
        weights = state["state_dict"]
    elif fmt == FULL_FORMAT:
        if checkpoint_key not in state:
            raise ValueError(f"{path} has no {checkpoint_key!r} weights; choose 'teacher' or 'student'")
        weights = strip_prefix(state[checkpoint_key], "backbone.")
    else:
        raise ValueError(
            f"{path} is not a dinoserve checkpoint (no 'format' key of {FULL_FORMAT!r} or {BACKBONE_FORMAT!r})"
        )
    spec = BackboneSpec(**{**state["backbone"], "drop_path_rate": 0.0})
    return spec, state["method"], weights


def build_model(spec: BackboneSpec, weights: dict) -> nn.Module:
    vit = build_backbone(spec)
    missing, unexpected = vit.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit {spec.arch}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return vit.eval()


def model_card(name: str, method: str, spec: BackboneSpec, source: Path, checkpoint_key: str,
               max_batch: int, queue_delay_us: int) -> dict:
    tokens = {"name": None, "dtype": "FP32"}
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": method,
        "arch": spec.arch,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "num_heads": spec.num_heads,
        "depth": spec.depth,
        "num_prefix_tokens": 1,
        "pos_embed": {"grid": [spec.img_size // spec.patch_size] * 2, "interpolation": "timm"},
        "precision": "fp32",
        "preprocess": {"resize": 256, "crop": 224, "interpolation": "bicubic",
                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "segmentation": {"size": 480},
        "inputs": {"pixel_values": {**tokens, "name": INPUT_NAME, "shape": ["B", 3, "H", "W"]}},
        "outputs": {
            "embedding": {**tokens, "name": "embedding", "shape": ["B", spec.embed_dim]},
            "attention": {**tokens, "name": "attention", "shape": ["B", spec.num_heads, "(H/p)*(W/p)"]},
            "patch_tokens": {**tokens, "name": "patch_tokens", "shape": ["B", "(H/p)*(W/p)", spec.embed_dim]},
        },
        "serving": {"max_batch_size": max_batch, "max_queue_delay_microseconds": queue_delay_us},
        "source": {"checkpoint": source.name, "sha256": sha256_file(source), "checkpoint_key": checkpoint_key},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dinoserve_version": __version__,
    }


def triton_config(name: str, spec: BackboneSpec, max_batch: int, queue_delay_us: int) -> str:
    """``config.pbtxt`` for Triton's ONNX Runtime backend with dynamic batching."""
    d, h = spec.embed_dim, spec.num_heads
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ 3, -1, -1 ] }}
]
output [
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ {d} ] }},
  {{ name: "attention" data_type: TYPE_FP32 dims: [ {h}, -1 ] }},
  {{ name: "patch_tokens" data_type: TYPE_FP32 dims: [ -1, {d} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [ {{ kind: KIND_AUTO count: 1 }} ]
"""


def export_onnx(graph: BundleGraph, spec: BackboneSpec, path: Path) -> None:
    """Dynamo export with dynamic batch, height and width (the legacy exporter cannot trace timm's
    antialiased bicubic position-embedding resize with symbolic sizes)."""
    p = spec.patch_size
    batch = torch.export.Dim("batch", min=1, max=4096)
    rows = torch.export.Dim("rows", min=1, max=512)
    cols = torch.export.Dim("cols", min=1, max=512)
    # Non-square example so that height and width stay independent symbols.
    example = torch.randn(2, 3, 7 * p, 5 * p)
    program = torch.onnx.export(
        graph, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"pixel_values": {0: batch, 2: p * rows, 3: p * cols}},
    )
    program.save(str(path))


def export_bundle(checkpoint: Path, repository: Path, name: str, checkpoint_key: str = "teacher",
                  max_batch: int = DEFAULT_MAX_BATCH, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                  verify: bool = True, progress: bool = True) -> Path:
    """Export ``checkpoint`` into ``repository/name``; returns the model directory.

    With ``verify`` the ONNX file is run in onnxruntime at two sizes and compared with PyTorch.
    """
    checkpoint, repository = Path(checkpoint), Path(repository)
    steps = ["load", "export", "verify"] if verify else ["load", "export"]
    bar = tqdm(total=len(steps), desc=f"export {name}", unit="step", disable=not progress)
    spec, method, weights = load_backbone(checkpoint, checkpoint_key)
    graph = BundleGraph(build_model(spec, weights)).eval()
    bar.update(1)

    model_dir = repository / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    tmp = version_dir / ".model.onnx.tmp"
    started = time.perf_counter()
    export_onnx(graph, spec, tmp)
    bar.update(1)
    if verify:
        verify_onnx(graph, tmp, spec)
        bar.update(1)
    tmp.replace(onnx_path)
    (model_dir / "config.pbtxt").write_text(triton_config(name, spec, max_batch, queue_delay_us))
    card = model_card(name, method, spec, checkpoint, checkpoint_key, max_batch, queue_delay_us)
    (model_dir / CARD_FILENAME).write_text(json.dumps(card, indent=2) + "\n")
    bar.close()
    log.info("exported %s to %s in %.1f s", checkpoint, model_dir, time.perf_counter() - started)
    return model_dir


def verify_onnx(graph: BundleGraph, onnx_path: Path, spec: BackboneSpec, atol: float = 1e-4) -> None:
    """Compare onnxruntime with PyTorch on a square and a non-square input; raise on a mismatch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    p = spec.patch_size
    generator = torch.Generator().manual_seed(0)
    for shape in ((1, 3, 14 * p, 14 * p), (2, 3, 9 * p, 12 * p)):
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = graph(x)
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        for out_name, e, g in zip(OUTPUT_NAMES, expected, got):
            diff = float(abs(e.numpy() - g).max())
            if e.shape != g.shape or diff > atol:
                raise RuntimeError(f"ONNX output {out_name!r} at input {shape} differs from PyTorch: "
                                   f"shape {tuple(g.shape)} vs {tuple(e.shape)}, max abs diff {diff:.2e}")
