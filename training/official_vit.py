"""The official DINO / iBOT position-embedding interpolation, for weights trained with that code.

Reference: ``VisionTransformer.interpolate_pos_encoding`` in facebookresearch/dino
``vision_transformer.py`` (iBOT's ``models/vision_transformer.py`` is the same). For an input of
``rows × cols`` patches and position embeddings stored on a ``side × side`` grid (``N = side²``) it

- returns the stored embeddings unchanged when ``rows == cols == side``;
- otherwise resizes the grid with ``F.interpolate(..., scale_factor=((rows + 0.1) / √N, (cols + 0.1) / √N),
  mode="bicubic")`` (``align_corners=False``). Because a ``scale_factor`` is passed, PyTorch samples
  output pixel ``i`` at ``(i + 0.5) / scale_factor - 0.5``, not at ``(i + 0.5) · side / rows - 0.5``:
  the ``+ 0.1`` moves every sample, so timm's ``resample_abs_pos_embed`` (``size=``, antialiased) gives
  different numbers.

``official_pos_encoding`` runs the official code itself in eager PyTorch (training: same numbers and
same gradients as the official model). Under export (``torch.export`` / ONNX) it computes the same resize
as two small interpolation matrices built from the (symbolic) grid size, so the ONNX graph keeps H and W
dynamic. The reciprocal scale is
``10·side / (10·rows + 1)``, a ratio of integers that float32 division rounds exactly like PyTorch's
``float(1 / scale_factor)``; the cubic weights (Keys, a = -0.75) and clamped border taps follow
PyTorch's ``upsample_bicubic2d``. What remains is float32 evaluation order (≈1e-7 relative).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic convolution constant


def cubic_resize_matrix(in_size: int, out_size, inv_scale: torch.Tensor) -> torch.Tensor:
    """``[out_size, in_size]`` matrix of ``upsample_bicubic2d`` along one axis (``align_corners=False``).

    ``inv_scale`` is the float32 source step per output pixel (``1 / scale_factor``).
    """
    a = CUBIC_A
    dst = torch.arange(out_size, dtype=torch.float32)
    src = inv_scale * (dst + 0.5) - 0.5
    base = torch.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)
    taps = (base.to(torch.int64)[:, None] + torch.arange(-1, 3)).clamp(0, in_size - 1)
    one_hot = (taps[:, :, None] == torch.arange(in_size)).to(weights.dtype)
    return (one_hot * weights[:, :, None]).sum(dim=1)


def official_pos_encoding(pos_embed: torch.Tensor, rows, cols) -> torch.Tensor:
    """Official ``interpolate_pos_encoding`` for a ``rows × cols`` patch grid: ``[1, 1 + rows·cols, D]``.

    ``pos_embed`` is ``[1, 1 + side², D]`` (CLS position first); ``rows`` and ``cols`` may be symbolic
    while exporting.
    """
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return _pos_encoding_by_matrices(pos_embed, rows, cols)
    n = pos_embed.shape[1] - 1
    if rows * cols == n and rows == cols:
        return pos_embed
    side, dim = math.sqrt(n), pos_embed.shape[2]
    grid = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    return torch.cat((pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def _pos_encoding_by_matrices(pos_embed: torch.Tensor, rows, cols) -> torch.Tensor:
    """:func:`official_pos_encoding` as two interpolation matrices, for graphs with symbolic sizes."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    dim = pos_embed.shape[2]
    r = torch.full((), rows, dtype=torch.float32)
    c = torch.full((), cols, dtype=torch.float32)
    # The official code returns the stored table when the grid is the training grid; with a step of
    # exactly 1 the cubic weights are (0, 1, 0, 0) and the matrices below are the identity.
    same = (r == side) & (c == side)
    one = torch.ones((), dtype=torch.float32)
    inv_r = torch.where(same, one, (10.0 * side) / (10.0 * r + 1.0))
    inv_c = torch.where(same, one, (10.0 * side) / (10.0 * c + 1.0))
    grid = pos_embed[0, 1:].reshape(side, side, dim)
    along_cols = cubic_resize_matrix(side, cols, inv_c) @ grid  # [side, cols, D]
    resized = cubic_resize_matrix(side, rows, inv_r) @ along_cols.reshape(side, cols * dim)
    return torch.cat([pos_embed[:, :1], resized.reshape(1, rows * cols, dim)], dim=1)


class OfficialViT(VisionTransformer):
    """timm ``VisionTransformer`` with the official DINO/iBOT position-embedding interpolation.

    Same parameters and keys as timm's (which are the official ones); only ``_pos_embed`` differs.
    Needs a CLS token whose position is embedded and no register tokens, the official layout.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.cls_token is None or self.num_reg_tokens or self.no_embed_class:
            raise ValueError("the official interpolation needs a CLS token with a position embedding "
                             "and no register tokens")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, rows, cols, D = x.shape  # patch grid, NHWC (``dynamic_img_size``)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, rows * cols, D)], dim=1)
        return self.pos_drop(x + official_pos_encoding(self.pos_embed, rows, cols))
