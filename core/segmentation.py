"""Foreground masks from the last block's CLS→patch attention, without labels.

The thresholding rule is DINO's (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers", ``visualize_attention.py`` of facebookresearch/dino): per head, keep the patches that
hold ``keep_mass`` of the attention mass. The graph alternative is TokenCut's (Wang et al. 2022,
"Self-Supervised Transformers for Unsupervised Object Discovery using Normalized Cut",
``object_discovery.py`` of YangtaoWANG95/TokenCut): a normalised cut of the patch-feature affinity.
Around them: the geometry that maps an image of any aspect ratio onto the patch grid and the masks
back onto the image, and the encodings the API returns. NumPy and Pillow only: the gateway never
imports torch.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageFilter

from .model_card import Preprocess
from .transform import normalize, resized_size

MAX_SIZE = 1024  # largest shorter side accepted for the model input
MAX_SIDE = 2048  # longest side of the model input; elongated images are scaled down to fit
ATTENTION_METHODS = ("mean", "union", "head")
METHODS = (*ATTENTION_METHODS, "tokencut")
TOKENCUT_TAU = 0.2  # cosine similarity above which two patches are joined (TokenCut's value)
TOKENCUT_EPS = 1e-5  # weight of every other pair: keeps the graph connected so the degrees stay positive
MAX_GRAPH_PATCHES = 6400  # the dense affinity costs 4 bytes per pair of patches: 164 MB at 80x80
_LANCZOS_MAX_STEPS = 400
_LANCZOS_CHECK_EVERY = 16
_LANCZOS_TOLERANCE = 1e-6
OUTPUTS = ("mask_png", "rle", "grid", "heads", "overlay")

_HEAT_COLOUR = np.array([255, 0, 0], dtype=np.float32)
_HEAT_OPACITY = 0.5
_CONTOUR_COLOUR = (255, 255, 0)


def attention_masks(attention: np.ndarray, grid: tuple[int, int], keep_mass: float = 0.6) -> np.ndarray:
    """DINO's per-head masks: the patches holding ``keep_mass`` of each head's attention mass.

    ``attention`` ``(heads, h*w)``, non-negative, rows need not sum to 1; ``grid`` ``(h, w)`` →
    bool ``(heads, h, w)``. As in ``visualize_attention.py``: sort each row ascending, divide by its
    sum, take the cumulative sum and keep the patches where it is strictly above ``1 - keep_mass``, so
    the patch that crosses the threshold is kept and the kept mass is at least ``keep_mass``.

    Ties: the reference leaves the order of equal values to ``torch.sort`` (not stable), so which of
    several equal patches at the cut survive is unspecified there. Here the sort is stable: equal
    patches are dropped in row-major order, keeping the later ones. The number of kept patches, and the
    mask wherever the cut does not split a group of equal values, are the reference's. Arithmetic is in
    float64; the reference's float32 can differ only for a patch whose cumulative mass is within float32
    rounding of the threshold.
    """
    if not 0 < keep_mass <= 1:
        raise ValueError(f"keep_mass must be in (0, 1], got {keep_mass}")
    attention = np.asarray(attention, dtype=np.float64)
    h, w = grid
    if attention.ndim != 2 or attention.shape[1] != h * w:
        raise ValueError(f"attention of shape {attention.shape} does not fit a {h}x{w} patch grid")
    order = np.argsort(attention, axis=1, kind="stable")
    ascending = np.take_along_axis(attention, order, axis=1)
    totals = ascending.sum(axis=1, keepdims=True)
    if not np.all(totals > 0):
        raise ValueError("every head needs some attention mass on the patches")
    keep_sorted = np.cumsum(ascending / totals, axis=1) > 1 - keep_mass
    masks = np.empty_like(keep_sorted)
    np.put_along_axis(masks, order, keep_sorted, axis=1)
    return masks.reshape(-1, h, w)


def foreground_mask(attention: np.ndarray, grid: tuple[int, int], keep_mass: float = 0.6,
                    method: str = "mean", head: int = 0) -> np.ndarray:
    """One bool ``(h, w)`` mask from the heads of ``attention`` ``(heads, h*w)``.

    ``"mean"`` (default) thresholds the heads' mean attention with :func:`attention_masks`: one
    ``keep_mass`` budget for the whole image, so a head that spreads its attention over the background
    cannot add its background patches on its own. ``"union"`` keeps a patch that any head keeps: larger
    masks, higher recall. ``"head"`` is the mask of head number ``head`` alone: DINO shows and scores
    the best head of a model, which ``bench/segmentation.py`` finds on held-out images (choosing it per
    image would need the ground truth). The graph method is :func:`tokencut_mask`.
    """
    if method == "mean":
        return attention_masks(np.asarray(attention).mean(axis=0, keepdims=True), grid, keep_mass)[0]
    if method == "union":
        return attention_masks(attention, grid, keep_mass).any(axis=0)
    if method == "head":
        heads = len(attention)
        if not 0 <= head < heads:
            raise ValueError(f"head must be between 0 and {heads - 1}, got {head}")
        return attention_masks(np.asarray(attention)[head:head + 1], grid, keep_mass)[0]
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(ATTENTION_METHODS)}")


def tokencut_mask(patch_tokens: np.ndarray, grid: tuple[int, int], tau: float = TOKENCUT_TAU,
                  eps: float = TOKENCUT_EPS) -> np.ndarray:
    """TokenCut's foreground: a normalised cut of the patch graph, the salient side's connected part.

    ``patch_tokens`` ``(h*w, D)`` → bool ``(h, w)``. As ``ncut`` in TokenCut's ``object_discovery.py``:
    the affinity is the cosine similarity of the tokens, made binary (1 above ``tau``, ``eps`` elsewhere);
    the second smallest generalised eigenvector of ``(D - W) x = λ D x`` (D the degrees) splits the
    patches at its mean; the foreground is the side holding the patch of largest ``|x|``, cut down to the
    4-connected component of that patch (``scipy.ndimage.label``'s default there). The eigenvector is
    found by Lanczos iteration on ``D^-1/2 W D^-1/2`` (no SciPy in the gateway); it is unique up to sign,
    which the salient-patch rule makes irrelevant.
    """
    h, w = grid
    tokens = np.asarray(patch_tokens, dtype=np.float32)
    if tokens.ndim != 2 or len(tokens) != h * w:
        raise ValueError(f"patch tokens of shape {tokens.shape} do not fit a {h}x{w} patch grid")
    if h * w > MAX_GRAPH_PATCHES:
        raise ValueError(f"the graph method takes at most {MAX_GRAPH_PATCHES} patches; a {h}x{w} grid "
                         "has more: use a smaller size")
    if h * w == 1:
        return np.ones((1, 1), dtype=bool)
    unit = tokens / np.maximum(np.linalg.norm(tokens, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    weights = np.where(unit @ unit.T > tau, np.float32(1), np.float32(eps))
    degrees = weights.sum(axis=1, dtype=np.float64)
    inv_sqrt = (1 / np.sqrt(degrees)).astype(np.float32)
    weights *= inv_sqrt[:, None]
    weights *= inv_sqrt[None, :]
    # D^-1/2 W D^-1/2 has eigenvalue 1 on D^1/2 1; the next largest is the second smallest of the cut.
    trivial = np.sqrt(degrees) / np.linalg.norm(np.sqrt(degrees))
    vector = second_eigenvector(weights, trivial) * inv_sqrt  # back to x = D^-1/2 y
    side = vector > vector.mean()
    seed = int(np.argmax(np.abs(vector)))
    if not side[seed]:
        side = ~side
    return connected_component(side.reshape(h, w), divmod(seed, w))


def second_eigenvector(matrix: np.ndarray, trivial: np.ndarray) -> np.ndarray:
    """Unit eigenvector of the largest eigenvalue of symmetric ``matrix`` ``(n, n)`` orthogonal to the
    unit eigenvector ``trivial``: Lanczos iteration with full reorthogonalisation, in float64 except
    the matrix products, stopped when the Ritz residual is below ``_LANCZOS_TOLERANCE``."""
    n = len(trivial)
    steps = min(n - 1, _LANCZOS_MAX_STEPS)
    basis = np.zeros((steps + 2, n))
    basis[0] = trivial
    start = np.random.default_rng(0).standard_normal(n)  # fixed: the same image gives the same mask
    start -= trivial * (trivial @ start)
    basis[1] = start / np.linalg.norm(start)
    diagonal, off_diagonal = [], []
    j = 0
    while True:
        j += 1
        v = (matrix @ basis[j].astype(matrix.dtype)).astype(np.float64)
        diagonal.append(basis[j] @ v)
        for _ in range(2):  # twice is enough to keep the basis orthogonal to working precision
            v -= basis[:j + 1].T @ (basis[:j + 1] @ v)
        beta = float(np.linalg.norm(v))
        done = j == steps or beta < _LANCZOS_TOLERANCE
        if done or j % _LANCZOS_CHECK_EVERY == 0:
            tridiagonal = np.diag(diagonal) + np.diag(off_diagonal, 1) + np.diag(off_diagonal, -1)
            ritz = np.linalg.eigh(tridiagonal)[1][:, -1]
            if done or beta * abs(ritz[-1]) < _LANCZOS_TOLERANCE:  # ‖A y - θ y‖ of the Ritz pair
                return ritz @ basis[1:j + 1]
        off_diagonal.append(beta)
        basis[j + 1] = v / beta


def connected_component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of bool ``mask`` ``(h, w)`` holding the patch ``seed`` (row, column);
    all False when the seed is not in the mask."""
    h, w = mask.shape
    component = np.zeros((h, w), dtype=bool)
    if not mask[seed]:
        return component
    component[seed] = True
    stack = [seed]
    while stack:
        r, c = stack.pop()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < h and 0 <= nc < w and mask[nr, nc] and not component[nr, nc]:
                component[nr, nc] = True
                stack.append((nr, nc))
    return component


def patch_mask(method: str, attention: np.ndarray, grid: tuple[int, int], keep_mass: float = 0.6,
               head: int = 0, patch_tokens: np.ndarray | None = None) -> np.ndarray:
    """The foreground on the patch grid by ``method``: :func:`tokencut_mask` of ``patch_tokens`` for
    ``"tokencut"``, :func:`foreground_mask` of ``attention`` for the others."""
    if method == "tokencut":
        if patch_tokens is None:
            raise ValueError("the tokencut method needs the patch tokens")
        return tokencut_mask(patch_tokens, grid)
    return foreground_mask(attention, grid, keep_mass, method, head)


def model_input_size(width: int, height: int, size: int, patch: int) -> tuple[int, int]:
    """(width, height) of the model input for an image of ``width`` x ``height``.

    The shorter side goes to ``size`` (the long side truncated, as torchvision's ``Resize``); an input
    whose long side would pass ``MAX_SIDE`` is scaled down to it instead. Both sides are then rounded
    down to multiples of ``patch``. The whole image is resized to that (an aspect change below one
    patch), where DINO's script crops the remainder off: every pixel of the photo has a patch.
    """
    if not patch <= size <= MAX_SIZE:
        raise ValueError(f"size must be between the patch size {patch} and {MAX_SIZE}, got {size}")
    w, h = resized_size(width, height, size)
    if max(w, h) > MAX_SIDE:
        w, h = (MAX_SIDE, int(MAX_SIDE * height / width)) if w > h else (int(MAX_SIDE * width / height), MAX_SIDE)
    w, h = w // patch * patch, h // patch * patch
    if min(w, h) == 0:
        raise ValueError(f"a {width}x{height} image is too elongated for a {patch}-pixel patch grid")
    return w, h


def segmentation_input(img: Image.Image, input_size: tuple[int, int], spec: Preprocess) -> np.ndarray:
    """RGB picture → float32 ``(3, H, W)`` for ``input_size`` = (W, H): bicubic resize, card mean/std."""
    return normalize(np.asarray(img.resize(input_size, Image.Resampling.BICUBIC)), spec)


def grid_to_image(grid_mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Patch-grid bool ``(h, w)`` → bool ``(height, width)`` for ``size`` = (width, height).

    Nearest neighbour from pixel centres, the same as repeating each patch over its pixels of the model
    input (which covers the whole image) and resizing that to the photo with nearest.
    """
    grid_image = Image.fromarray(np.asarray(grid_mask, dtype=np.uint8) * 255)
    return np.asarray(grid_image.resize(size, Image.Resampling.NEAREST)) > 0


def encode_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool ``(height, width)`` mask: run lengths over the mask in column-major
    (Fortran) order, starting with a run of zeros (0 when the first pixel is set)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # zlib's default level 6: much slower, for smaller files
    return base64.b64encode(buf.getvalue()).decode("ascii")


def mask_image(mask: np.ndarray) -> Image.Image:
    """bool ``(height, width)`` → mode ``L`` picture, 255 on the foreground, 0 elsewhere."""
    return Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)


def heatmap_images(attention: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> list[Image.Image]:
    """One mode ``L`` picture per head at ``size`` = (width, height): attention over the head's maximum,
    each patch a flat block (nearest, as DINO draws its heatmaps)."""
    h, w = grid
    maps = np.asarray(attention, dtype=np.float32).reshape(-1, h, w)
    scaled = maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), np.finfo(np.float32).tiny)
    return [Image.fromarray(np.round(m * 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
            for m in scaled]


def overlay_image(img: Image.Image, heat: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The photo with a heatmap blended in and the mask's contour drawn, for people to look at.

    ``heat`` float ``(h, w)`` on the patch grid (smoothed bilinearly to the photo), ``mask`` bool at the
    photo's ``(height, width)``.
    """
    heat = np.asarray(heat, dtype=np.float32)
    heat = heat / max(float(heat.max()), np.finfo(np.float32).tiny)
    smooth = np.asarray(Image.fromarray(heat).resize(img.size, Image.Resampling.BILINEAR))
    alpha = _HEAT_OPACITY * np.clip(smooth, 0, 1)[..., None]
    blended = np.asarray(img, dtype=np.float32) * (1 - alpha) + _HEAT_COLOUR * alpha
    out = Image.fromarray(np.round(blended).astype(np.uint8))
    inside = eroded = mask_image(mask)
    for _ in range(max(1, round(min(img.size) / 250))):  # repeated 3x3 erosions: far faster than one large
        eroded = eroded.filter(ImageFilter.MinFilter(3))
    contour = np.asarray(inside) > np.asarray(eroded)
    out.paste(_CONTOUR_COLOUR, mask=Image.fromarray(contour.astype(np.uint8) * 255))
    return out


def render_outputs(img: Image.Image, attention: np.ndarray, grid: tuple[int, int], keep_mass: float,
                   method: str, outputs: list[str], head: int = 0,
                   patch_tokens: np.ndarray | None = None) -> dict:
    """The requested encodings of the masks of ``attention`` ``(heads, h*w)`` for the photo ``img``.

    ``mask_png`` and ``rle``: the :func:`patch_mask` at the photo's size; ``grid``: ``grid_mask``
    (that mask on the patch grid, ``[h][w]`` of 0/1) and ``grid_masks`` (each head's
    :func:`attention_masks`, ``[heads][h][w]``); ``heads``: ``heads_png``, one heatmap per head;
    ``overlay``: ``overlay_png``.
    """
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; use any of {', '.join(OUTPUTS)}")
    body: dict = {}
    grid_mask = patch_mask(method, attention, grid, keep_mass, head, patch_tokens)
    mask = grid_to_image(grid_mask, img.size) if {"mask_png", "rle", "overlay"} & set(outputs) else None
    if "mask_png" in outputs:
        body["mask_png"] = png_base64(mask_image(mask))
    if "rle" in outputs:
        body["rle"] = encode_rle(mask)
    if "grid" in outputs:
        body["grid_mask"] = grid_mask.astype(np.uint8).tolist()
        body["grid_masks"] = attention_masks(attention, grid, keep_mass).astype(np.uint8).tolist()
    if "heads" in outputs:
        body["heads_png"] = [png_base64(m) for m in heatmap_images(attention, grid, img.size)]
    if "overlay" in outputs:
        heat = np.asarray(attention, dtype=np.float32).mean(axis=0).reshape(grid)
        body["overlay_png"] = png_base64(overlay_image(img, heat, mask))
    return body
