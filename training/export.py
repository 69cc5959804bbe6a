"""``dinoserve export``: checkpoint or hub name → Triton model-repository entry (the bundle of docs/bundle.md).

Writes ``<repository>/<name>/<version>/model.onnx`` (or ``model.plan``, a TensorRT engine), ``config.pbtxt``
and the model card ``dinoserve.json``. The graph maps ``pixel_values [B, 3, H, W]`` to ``embedding``
(final-norm CLS), ``attention`` (the last block's CLS→patch attention per head) and ``patch_tokens``,
with B, H and W dynamic and the position embeddings interpolated inside the graph: by the official
DINO/iBOT rule (``official_vit.py``) for official weights and ours (we train with that rule), by timm's
resample for timm weights. The model card's ``pos_embed.interpolation`` says which.

Every accepted checkpoint shape is read by ``weights.py``. Nothing is written to the repository until
the graph is exported and verified; a refused file leaves it untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from core import __version__
from core.segmentation import MAX_SIZE
from core.model_card import (
    CARD_FILENAME,
    FORMAT_VERSION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_NAME,
    OUTPUT_NAMES,
    model_versions,
)

from .checkpoint import sha256_file
from .hub import HUB, HubWeights, fetch
from .models import BackboneSpec
from .weights import CheckpointError, LoadedBackbone, fit_weights, load_checkpoint

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16")
TENSORRT_MAX_SIDE = 512  # largest input side of the TensorRT engine's optimisation profile


@dataclass(frozen=True)
class Serving:
    """Triton's batching of the bundle: ``config.pbtxt`` and the model card's ``serving``."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 2000  # the dynamic batcher's wait for more requests
    max_queue_size: int = 256  # requests waiting in Triton's batcher before it refuses more
    instances: int = 1  # model instances per device


@dataclass(frozen=True)
class ExportOptions:
    """What ``export_bundle`` reads from the source and how it writes the bundle (``dinoserve export``'s
    options; these defaults are its defaults). :class:`CheckpointError` for a value it cannot take."""

    checkpoint_key: Literal["teacher", "student"] = "teacher"  # the network of a training checkpoint
    format: Literal["onnx", "tensorrt"] = "onnx"
    precision: Literal["fp32", "fp16"] = "fp32"  # of the ONNX file; a TensorRT engine is fp16
    version: int | None = None  # version folder; default: one past the newest (1 for a new model)
    num_heads: int | None = None  # for widths without a standard head count
    pos_interpolation: Literal["official", "timm"] | None = None  # default: the source format's rule
    method: Literal["dino", "ibot"] | None = None  # recorded in the card; default: read from the file
    cache_dir: Path | None = None  # hub downloads
    serving: Serving = field(default_factory=Serving)
    # The model card's embedding transform (shorter side to ``resize``, centre crop ``crop``) and default
    # segmentation input; the defaults are DINO's evaluation transform and mask size, for models trained at 224.
    # A model trained on smaller crops is served at its own scale: crop = its training crop.
    crop: int = 224
    resize: int | None = None  # default: crop x 256 / 224, DINO's ratio
    segmentation_size: int = 480
    verify: bool = True  # run the exported file at three sizes and compare with PyTorch
    progress: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise CheckpointError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.precision not in PRECISIONS:
            raise CheckpointError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.version is not None and self.version < 1:
            raise CheckpointError(f"--version must be 1 or more, got {self.version}")
        if self.resize is None:  # frozen: set once, here
            object.__setattr__(self, "resize", round(self.crop * 256 / 224))
        if not 1 <= self.crop <= self.resize:
            raise CheckpointError(f"--crop must be at least 1 and at most --resize, got crop {self.crop} and "
                                  f"resize {self.resize}")
        if not 1 <= self.segmentation_size <= MAX_SIZE:
            raise CheckpointError(f"--segmentation-size must be between 1 and {MAX_SIZE}, got {self.segmentation_size}")


def block_with_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm ``Block`` computing its softmax attention explicitly (a fused kernel would hide it).

    Same arithmetic as the official ``Attention.forward``, ``softmax((q @ kᵀ) · scale)``; returns the block
    output and the attention probabilities ``[B, heads, N, N]``.
    """
    attn_mod = block.attn
    y = block.norm1(x)
    B, N, _ = y.shape
    qkv = attn_mod.qkv(y).reshape(B, N, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    attn = ((q @ k.transpose(-2, -1)) * attn_mod.scale).softmax(dim=-1)
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


def model_card(name: str, loaded: LoadedBackbone, *, source: Path, hub: HubWeights | None, onnx_info: dict,
               options: ExportOptions, version: int) -> dict:
    """The model card ``dinoserve.json`` of a bundle (docs/bundle.md lists its fields)."""
    spec, fmt, serving = loaded.spec, options.format, options.serving
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
        "precision": "fp16" if fmt == "tensorrt" else options.precision,
        "version": version,
        "onnx": onnx_info,
        "preprocess": {"resize": options.resize, "crop": options.crop, "interpolation": "bicubic",
                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "segmentation": {"size": options.segmentation_size},
        "inputs": {"pixel_values": {**dtype, "name": INPUT_NAME, "shape": ["B", 3, "H", "W"]}},
        "outputs": {
            "embedding": {**dtype, "name": "embedding", "shape": ["B", spec.embed_dim]},
            "attention": {**dtype, "name": "attention", "shape": ["B", spec.num_heads, "(H/p)*(W/p)"]},
            "patch_tokens": {**dtype, "name": "patch_tokens", "shape": ["B", "(H/p)*(W/p)", spec.embed_dim]},
        },
        "serving": {"max_batch_size": serving.max_batch_size,
                    "max_queue_delay_microseconds": serving.max_queue_delay_us,
                    "max_queue_size": serving.max_queue_size, "instances": serving.instances},
        "source": {
            "checkpoint": source.name, "sha256": sha256_file(source), "format": loaded.source_format,
            "checkpoint_key": loaded.checkpoint_key,
            **({"hub": hub.name, "url": hub.url} if hub else {}),
        },
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dinoserve_version": __version__,
    }


def warmup_side(spec: BackboneSpec, crop: int = 224) -> int:
    """The embedding input side (the card's centre crop), rounded to a multiple of the patch."""
    return max(1, round(crop / spec.patch_size)) * spec.patch_size


def triton_config(name: str, spec: BackboneSpec, serving: Serving, platform: str = "onnxruntime_onnx",
                  crop: int = 224) -> str:
    """``config.pbtxt`` for Triton's ONNX Runtime (or TensorRT) backend: dynamic batching with a bounded
    queue (requests beyond it are refused at once instead of waiting), ``serving.instances`` copies of the
    model, a warm-up inference at the embedding size so that readiness means warm, and the newest version
    folder served."""
    d, h = spec.embed_dim, spec.num_heads
    side = warmup_side(spec, crop)
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO"
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {serving.max_batch_size}
version_policy: {{ latest {{ num_versions: 1 }} }}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ 3, -1, -1 ] }}
]
output [
  {{ name: "embedding" data_type: TYPE_FP32 dims: [ {d} ] }},
  {{ name: "attention" data_type: TYPE_FP32 dims: [ {h}, -1 ] }},
  {{ name: "patch_tokens" data_type: TYPE_FP32 dims: [ -1, {d} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {serving.max_queue_delay_us}
  default_queue_policy {{ max_queue_size: {serving.max_queue_size} }}
}}
instance_group [ {{ kind: {kind} count: {serving.instances} }} ]
model_warmup [
  {{
    name: "embedding_{side}x{side}"
    batch_size: 1
    inputs {{ key: "{INPUT_NAME}" value: {{ data_type: TYPE_FP32 dims: [ 3, {side}, {side} ] zero_data: true }} }}
  }}
]
"""


def convert_fp16(onnx_path: Path) -> None:
    """Rewrite the ONNX file with fp16 weights and arithmetic (for GPUs), keeping fp32 inputs and outputs
    so the bundle contract holds; softmax, the layer norms and the arithmetic on shapes (the cubic weights
    of the position-embedding resize) stay in fp32."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(onnx_path))
    with warnings.catch_warnings():  # one warning per weight below fp16's smallest normal; clamping is intended
        warnings.filterwarnings("ignore", "the float32 number", UserWarning)
        model = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=float16.DEFAULT_OP_BLOCK_LIST + ["LayerNormalization", "Softmax"],
            node_block_list=_shape_arithmetic(model.graph))
    onnx.save(model, str(onnx_path))


def _shape_arithmetic(graph) -> list[str]:
    """Names of the nodes that compute from tensor shapes and scalar constants only, not from pixel or
    weight values (graph nodes are in topological order)."""
    import math

    import onnx

    values = {i.name for i in graph.input}
    values |= {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and math.prod(t.dims) > 1}
    names = []
    for node in graph.node:
        if node.op_type != "Shape" and any(name in values for name in node.input):
            values.update(node.output)
        else:
            names.append(node.name)
    return names


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


def verify_onnx(graph: BundleGraph, onnx_path: Path, spec: BackboneSpec, atol: float = 1e-4,
                precision: str = "fp32", min_cosine: float = 0.999) -> list[tuple[tuple, dict[str, float]]]:
    """Compare onnxruntime with PyTorch at three sizes; returns the differences per output and raises
    when one is out of tolerance: max abs diff ``atol`` for fp32; for fp16, the cosine of every
    ``embedding`` row to fp32 at least ``min_cosine`` and attention within 100 × ``atol``."""
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
            limit = atol if precision == "fp32" else (100 * atol if out_name == "attention" else None)
            if limit is not None and diffs[out_name] > limit:
                raise RuntimeError(f"ONNX output {out_name!r} at input {shape} differs from PyTorch: max abs "
                                   f"diff {diffs[out_name]:.2e} > {limit:.0e}")
        if precision == "fp16":
            cosine = float(torch.nn.functional.cosine_similarity(torch.from_numpy(got[0]), expected[0], dim=-1).min())
            diffs["embedding_cosine"] = cosine
            if cosine < min_cosine:
                raise RuntimeError(f"fp16 embedding at input {shape} has cosine {cosine:.5f} to fp32 (< {min_cosine})")
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


def next_version(model_dir: Path, spec: BackboneSpec) -> int:
    """The version folder a new export goes to: 1 for a new model, else one past the newest; refuses to
    put a different architecture next to existing versions (config.pbtxt describes them all)."""
    versions = model_versions(model_dir)
    if not versions:
        return 1
    check_same_architecture(model_dir, spec)
    return versions[-1] + 1


def check_same_architecture(model_dir: Path, spec: BackboneSpec) -> None:
    card_path = model_dir / CARD_FILENAME
    if not (model_versions(model_dir) and card_path.is_file()):
        return
    card = json.loads(card_path.read_text())
    old = (card.get("patch_size"), card.get("embed_dim"), card.get("num_heads"))
    new = (spec.patch_size, spec.embed_dim, spec.num_heads)
    if old != new:
        raise CheckpointError(
            f"{model_dir} holds versions {', '.join(map(str, model_versions(model_dir)))} of a ViT with patch "
            f"{old[0]}, width {old[1]}, {old[2]} heads; this checkpoint is patch {new[0]}, width {new[1]}, "
            f"{new[2]} heads: export it under another --name")


def export_bundle(source: str | Path, repository: Path, name: str, options: ExportOptions = ExportOptions()) -> Path:
    """Export a checkpoint file or hub name into ``repository/name/<version>``; returns the model directory.

    ``options.version`` defaults to one past the newest existing version (1 for a new model), so a new
    export rolls out next to the old one (Triton serves the newest); an explicit version is overwritten.
    With ``options.verify`` the exported file is run (onnxruntime, or TensorRT for an engine) and compared
    with PyTorch at three sizes. Raises :class:`CheckpointError` (one line) for files that cannot be exported.
    """
    fmt, progress, version = options.format, options.progress, options.version
    if fmt == "tensorrt" and (reason := tensorrt_unavailable()):
        raise CheckpointError(f"--format tensorrt needs TensorRT and an NVIDIA GPU: {reason}; export --format "
                              "onnx here and build the engine on the GPU host")
    repository = Path(repository)
    model_dir = repository / name
    path, hub = resolve_source(source, options.cache_dir, progress)
    loaded = load_checkpoint(path, options.checkpoint_key, options.num_heads, options.pos_interpolation)
    if options.method or hub:
        loaded = replace(loaded, method=options.method or hub.method)
    if version is None:
        version = next_version(model_dir, loaded.spec)
    else:
        check_same_architecture(model_dir, loaded.spec)
    graph = BundleGraph(fit_weights(loaded.spec, loaded.weights, str(path))).eval()

    started = time.perf_counter()
    bar = tqdm(total=2 if options.verify else 1, desc=f"export {name}", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="dinoserve-export-") as staging:
        onnx_path = Path(staging) / "model.onnx"
        onnx_info = export_onnx(graph, loaded.spec, onnx_path)
        artefact = onnx_path
        if fmt == "tensorrt":
            artefact = Path(staging) / "model.plan"
            build_tensorrt_engine(onnx_path, artefact, loaded.spec, options.serving.max_batch_size)
        elif options.precision == "fp16":
            convert_fp16(onnx_path)
        bar.update(1)
        if options.verify:
            for shape, diffs in (verify_tensorrt(graph, artefact, loaded.spec) if fmt == "tensorrt" else
                                 verify_onnx(graph, artefact, loaded.spec, precision=options.precision)):
                log.info("verified %s: %s", "x".join(map(str, shape)),
                         ", ".join(f"{k} {v:.5f}" if "cosine" in k else f"{k} {v:.1e}" for k, v in diffs.items()))
            bar.update(1)
        version_dir = model_dir / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("model.onnx", "model.plan"):
            (version_dir / stale).unlink(missing_ok=True)
        shutil.move(str(artefact), version_dir / artefact.name)
    platform = "tensorrt_plan" if fmt == "tensorrt" else "onnxruntime_onnx"
    (model_dir / "config.pbtxt").write_text(
        triton_config(name, loaded.spec, options.serving, platform, options.crop))
    card = model_card(name, loaded, source=path, hub=hub, onnx_info=onnx_info, options=options, version=version)
    (model_dir / CARD_FILENAME).write_text(json.dumps(card, indent=2) + "\n")
    bar.close()
    log.info("exported %s to %s (version %d) in %.1f s", source, model_dir, version, time.perf_counter() - started)
    return model_dir
