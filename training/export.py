"""``dinoserve export``: checkpoint or hub name → Triton model-repository entry (DESIGN.md, contract 1).

Writes ``<repository>/<name>/1/model.onnx`` (or ``1/model.plan``, a TensorRT engine), ``config.pbtxt``
and the model card ``dinoserve.json``. The graph maps ``pixel_values [B, 3, H, W]`` to ``embedding``
(final-norm CLS), ``attention`` (the last block's CLS→patch attention per head) and ``patch_tokens``,
with B, H and W dynamic and the position embeddings interpolated inside the graph: as the official
DINO/iBOT code does for their weights (``official_vit.py``), as timm does for ours and timm's.

Every accepted checkpoint shape is read by ``weights.py``. Nothing is written to the repository until
the graph is exported and verified; a refused file leaves it untouched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
import shutil
import tempfile
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

from .checkpoint import sha256_file
from .hub import HUB, HubWeights, fetch
from .models import BackboneSpec
from .weights import CheckpointError, LoadedBackbone, fit_weights, load_checkpoint

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
DEFAULT_QUEUE_DELAY_US = 2000
FORMATS = ("onnx", "tensorrt")
TENSORRT_MAX_SIDE = 512  # largest input side of the TensorRT engine's optimisation profile


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
    """(backbone spec, method, prefix-free backbone state dict) of any accepted checkpoint file."""
    loaded = load_checkpoint(path, checkpoint_key)
    return loaded.spec, loaded.method, loaded.weights


def build_model(spec: BackboneSpec, weights: dict, source: str = "the weights") -> nn.Module:
    """``spec``'s ViT with ``weights`` loaded, in eval mode; a one-line error naming keys that do not fit."""
    return fit_weights(spec, weights, source)


def resolve_source(source: str | Path, cache_dir: Path | None = None,
                   progress: bool = True) -> tuple[Path, HubWeights | None]:
    """A checkpoint path, or a hub name downloaded (once) into the cache: (local path, hub entry)."""
    path = Path(source)
    if path.exists():
        return path, None
    if str(source) in HUB:
        return fetch(str(source), cache_dir, progress=progress), HUB[str(source)]
    raise CheckpointError(f"{source}: no such file, and not a hub name ({', '.join(HUB)})")


def tensorrt_unavailable() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def model_card(name: str, loaded: LoadedBackbone, source: Path, hub: HubWeights | None, fmt: str,
               onnx_info: dict, max_batch: int, queue_delay_us: int) -> dict:
    spec = loaded.spec
    dtype = {"name": None, "dtype": "FP32"}
    prefix = 1 + getattr(spec, "reg_tokens", 0)
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": loaded.method,
        "arch": spec.arch,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "num_heads": spec.num_heads,
        "depth": spec.depth,
        "num_prefix_tokens": prefix,
        "pos_embed": {"grid": [spec.img_size // spec.patch_size] * 2, "interpolation": loaded.pos_interpolation},
        "runtime": {"format": fmt, **({"tensorrt_max_side": TENSORRT_MAX_SIDE} if fmt == "tensorrt" else {})},
        "precision": "fp16" if fmt == "tensorrt" else "fp32",
        "onnx": onnx_info,
        "preprocess": {"resize": 256, "crop": 224, "interpolation": "bicubic",
                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "segmentation": {"size": 480},
        "inputs": {"pixel_values": {**dtype, "name": INPUT_NAME, "shape": ["B", 3, "H", "W"]}},
        "outputs": {
            "embedding": {**dtype, "name": "embedding", "shape": ["B", spec.embed_dim]},
            "attention": {**dtype, "name": "attention", "shape": ["B", spec.num_heads, "(H/p)*(W/p)"]},
            "patch_tokens": {**dtype, "name": "patch_tokens", "shape": ["B", "(H/p)*(W/p)", spec.embed_dim]},
        },
        "serving": {"max_batch_size": max_batch, "max_queue_delay_microseconds": queue_delay_us},
        "source": {
            "checkpoint": source.name, "sha256": sha256_file(source), "format": loaded.source_format,
            "checkpoint_key": loaded.checkpoint_key,
            **({"hub": hub.name, "url": hub.url} if hub else {}),
        },
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dinoserve_version": __version__,
    }


def triton_config(name: str, spec: BackboneSpec, max_batch: int, queue_delay_us: int,
                  platform: str = "onnxruntime_onnx") -> str:
    """``config.pbtxt`` for Triton's ONNX Runtime (or TensorRT) backend with dynamic batching."""
    d, h = spec.embed_dim, spec.num_heads
    return f"""name: "{name}"
platform: "{platform}"
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
instance_group [ {{ kind: {"KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO"} count: 1 }} ]
"""


def export_onnx(graph: BundleGraph, spec: BackboneSpec, path: Path) -> dict:
    """Dynamo export with dynamic batch, height and width (the legacy exporter cannot trace timm's
    antialiased bicubic position-embedding resize with symbolic sizes); returns opset and exporter."""
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
    opset = next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "exporter": f"torch.onnx dynamo (torch {torch.__version__.split('+')[0]})"}


def verify_sizes(spec: BackboneSpec) -> list[tuple[int, int, int, int]]:
    """The training grid (where the official code skips interpolation), a smaller non-square and a
    larger non-square input."""
    p, grid = spec.patch_size, spec.img_size // spec.patch_size
    return [(1, 3, grid * p, grid * p), (2, 3, 9 * p, 12 * p), (1, 3, 15 * p, 20 * p)]


def verify_onnx(graph: BundleGraph, onnx_path: Path, spec: BackboneSpec,
                atol: float = 1e-4) -> list[tuple[tuple, dict[str, float]]]:
    """Compare onnxruntime with PyTorch at three sizes; returns the max abs differences per output and
    raises when one exceeds ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    report = []
    for shape in verify_sizes(spec):
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = graph(x)
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        diffs = {}
        for out_name, e, g in zip(OUTPUT_NAMES, expected, got):
            if e.shape != g.shape:
                raise RuntimeError(f"ONNX output {out_name!r} at input {shape} has shape {tuple(g.shape)}, "
                                   f"PyTorch {tuple(e.shape)}")
            diffs[out_name] = float(abs(e.numpy() - g).max())
            if diffs[out_name] > atol:
                raise RuntimeError(f"ONNX output {out_name!r} at input {shape} differs from PyTorch: max abs "
                                   f"diff {diffs[out_name]:.2e} > {atol:.0e}")
        report.append((shape, diffs))
    return report


def build_tensorrt_engine(onnx_path: Path, plan_path: Path, spec: BackboneSpec, max_batch: int) -> None:
    """FP16 TensorRT engine of the ONNX graph with one optimisation profile: batch 1…``max_batch``,
    sides from one patch to ``TENSORRT_MAX_SIDE`` (optimised for 224²)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    p = spec.patch_size
    side, typical = TENSORRT_MAX_SIDE // p * p, 224 // p * p
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, 3, p, p), (min(8, max_batch), 3, typical, typical),
                      (max_batch, 3, side, side))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build an engine; its log above says why")
    plan_path.write_bytes(bytes(plan))


def run_tensorrt(plan_path: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the engine once on ``x`` (on the GPU); the outputs by name, on the CPU."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    x = x.cuda().contiguous()
    context.set_input_shape(INPUT_NAME, tuple(x.shape))
    context.set_tensor_address(INPUT_NAME, x.data_ptr())
    outputs = {}
    for name in OUTPUT_NAMES:
        outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return {name: t.cpu() for name, t in outputs.items()}


def verify_tensorrt(graph: BundleGraph, plan_path: Path, spec: BackboneSpec,
                    min_cosine: float = 0.999) -> list[tuple[tuple, dict[str, float]]]:
    """Cosine similarity of the FP16 engine's ``embedding`` to the FP32 graph at the verify sizes (up to
    the engine's largest side); raises below ``min_cosine``."""
    generator = torch.Generator().manual_seed(0)
    report = []
    for shape in verify_sizes(spec):
        if max(shape[2:]) > TENSORRT_MAX_SIDE:
            continue
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = graph(x)[0]
        got = run_tensorrt(plan_path, x)["embedding"]
        cosine = float(torch.nn.functional.cosine_similarity(got, expected, dim=-1).min())
        if cosine < min_cosine:
            raise RuntimeError(f"TensorRT embedding at input {shape} has cosine {cosine:.5f} to fp32 "
                               f"(< {min_cosine})")
        report.append((shape, {"embedding_cosine": cosine}))
    return report


def export_bundle(source: str | Path, repository: Path, name: str, checkpoint_key: str = "teacher",
                  max_batch: int = DEFAULT_MAX_BATCH, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                  verify: bool = True, progress: bool = True, fmt: str = "onnx", num_heads: int | None = None,
                  pos_interpolation: str | None = None, method: str | None = None,
                  cache_dir: Path | None = None) -> Path:
    """Export a checkpoint file or hub name into ``repository/name``; returns the model directory.

    With ``verify`` the exported file is run (onnxruntime, or TensorRT for an engine) and compared with
    PyTorch at three sizes. Raises :class:`CheckpointError` (one line) for files that cannot be exported.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "tensorrt" and (reason := tensorrt_unavailable()):
        raise CheckpointError(f"--format tensorrt needs TensorRT and an NVIDIA GPU: {reason}; export --format "
                              "onnx here and build the engine on the GPU host")
    repository = Path(repository)
    path, hub = resolve_source(source, cache_dir, progress)
    loaded = load_checkpoint(path, checkpoint_key, num_heads, pos_interpolation)
    if method or hub:
        loaded = replace(loaded, method=method or hub.method)
    graph = BundleGraph(fit_weights(loaded.spec, loaded.weights, str(path))).eval()

    started = time.perf_counter()
    bar = tqdm(total=2 if verify else 1, desc=f"export {name}", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="dinoserve-export-") as staging:
        onnx_path = Path(staging) / "model.onnx"
        onnx_info = export_onnx(graph, loaded.spec, onnx_path)
        artefact = onnx_path
        if fmt == "tensorrt":
            artefact = Path(staging) / "model.plan"
            build_tensorrt_engine(onnx_path, artefact, loaded.spec, max_batch)
        bar.update(1)
        if verify:
            check = verify_tensorrt if fmt == "tensorrt" else verify_onnx
            for shape, diffs in check(graph, artefact, loaded.spec):
                log.info("verified %s: %s", "x".join(map(str, shape)),
                         ", ".join(f"{k} {v:.5f}" if "cosine" in k else f"{k} {v:.1e}" for k, v in diffs.items()))
            bar.update(1)
        model_dir = repository / name
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("model.onnx", "model.plan"):
            (version_dir / stale).unlink(missing_ok=True)
        shutil.move(str(artefact), version_dir / artefact.name)
    platform = "tensorrt_plan" if fmt == "tensorrt" else "onnxruntime_onnx"
    (model_dir / "config.pbtxt").write_text(triton_config(name, loaded.spec, max_batch, queue_delay_us, platform))
    card = model_card(name, loaded, path, hub, fmt, onnx_info, max_batch, queue_delay_us)
    (model_dir / CARD_FILENAME).write_text(json.dumps(card, indent=2) + "\n")
    bar.close()
    log.info("exported %s to %s in %.1f s", source, model_dir, time.perf_counter() - started)
    return model_dir
