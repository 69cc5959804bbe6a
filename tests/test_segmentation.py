"""Segmentation: DINO's keep-the-mass rule on hand-built attention maps, TokenCut's normalised cut on
hand-built patch features, the geometry between photo and patch grid, the encodings, and
``POST /v1/segment`` through the real stack on non-square images."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from core.model_card import ModelCard, Preprocess
from core.segmentation import (
    MAX_GRAPH_PATCHES,
    MAX_SIDE,
    MAX_SIZE,
    attention_masks,
    connected_component,
    encode_rle,
    foreground_mask,
    grid_to_image,
    heatmap_images,
    model_input_size,
    overlay_image,
    render_outputs,
    second_eigenvector,
    segmentation_input,
    tokencut_mask,
)
from training.data import make_sample


def published_rule(attention: np.ndarray, grid: tuple[int, int], keep_mass: float) -> np.ndarray:
    """The thresholding block of DINO's ``visualize_attention.py``, in torch, operation for operation."""
    attentions = torch.from_numpy(attention.astype(np.float32))
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - keep_mass)
    idx2 = torch.argsort(idx)
    for head in range(attentions.shape[0]):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn.reshape(-1, *grid).numpy()


def decode_rle(rle: dict) -> np.ndarray:
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1  # runs alternate, zeros first
    return np.repeat(values, rle["counts"]).reshape((height, width), order="F")


def png_array(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


# attention_masks: DINO's rule ---------------------------------------------------------------------

def test_a_single_dominant_patch_holding_the_mass_is_the_only_patch_kept():
    attention = np.full((1, 12), 0.01)
    attention[0, 7] = 0.89
    masks = attention_masks(attention, (3, 4), keep_mass=0.6)
    assert masks.shape == (1, 3, 4) and masks.dtype == bool
    assert np.flatnonzero(masks[0]).tolist() == [7]


def test_the_patch_crossing_the_threshold_is_kept():
    # ascending 0.1, 0.2, 0.3, 0.4: cumulative 0.1, 0.3, 0.6, 1.0; keep 0.5 → above 0.5 are 0.6 and 1.0
    attention = np.array([[0.3, 0.1, 0.4, 0.2]])
    assert attention_masks(attention, (2, 2), keep_mass=0.5)[0].ravel().tolist() == [True, False, True, False]


def test_a_patch_whose_cumulative_mass_equals_the_threshold_exactly_is_dropped():
    # ascending .125 (patch 1), .25 (0), .625 (2): cumulative .125, .375, 1.0; keep .625 → above .375
    attention = np.array([[0.25, 0.125, 0.625]])
    assert attention_masks(attention, (1, 3), keep_mass=0.625)[0].ravel().tolist() == [False, False, True]
    np.testing.assert_array_equal(attention_masks(attention, (1, 3), 0.625), published_rule(attention, (1, 3), 0.625))


@pytest.mark.parametrize("grid, keep_mass, kept", [
    ((4, 4), 0.6, 10),   # cumulative k/16 > 0.4 for k ≥ 7
    ((3, 5), 0.5, 8),    # k/15 > 0.5 for k ≥ 8
    ((7, 9), 0.1, 7),    # k/63 > 0.9 for k ≥ 57
    ((2, 3), 1.0, 6),    # everything
])
def test_uniform_attention_keeps_the_count_the_rule_gives_and_the_last_patches_in_row_major_order(
        grid, keep_mass, kept):
    n = grid[0] * grid[1]
    masks = attention_masks(np.full((1, n), 0.37), grid, keep_mass)
    assert masks[0].ravel().tolist() == [False] * (n - kept) + [True] * kept
    assert masks.sum() == published_rule(np.full((1, n), 0.37), grid, keep_mass).sum()


def test_ties_at_the_cut_keep_the_later_patches_and_the_reference_count():
    # ascending 1 (patch 1), 1 (2), 1 (3), 3 (0), 4 (4) of 10: cumulative .1 .2 .3 .6 1.0 > .25
    attention = np.array([[3.0, 1.0, 1.0, 1.0, 4.0]])
    masks = attention_masks(attention, (1, 5), keep_mass=0.75)
    assert np.flatnonzero(masks[0]).tolist() == [0, 3, 4]
    assert masks.sum() == published_rule(attention, (1, 5), 0.75).sum()


def test_a_cut_inside_a_large_group_of_equal_patches_keeps_its_last_patches_in_row_major_order():
    attention = np.full((1, 400), 0.5)
    attention[0, ::7] = 0.2  # 58 low patches, 11.6 of 182.6; each high one adds 0.5
    # the first k high patches are dropped while (11.6 + 0.5 k) / 182.6 <= 0.4: k = 122
    high = np.flatnonzero(attention[0] == 0.5)
    masks = attention_masks(attention, (20, 20), keep_mass=0.6)
    assert np.flatnonzero(masks[0]).tolist() == high[122:].tolist()
    assert masks.sum() == published_rule(attention, (20, 20), 0.6).sum()


def test_heads_are_thresholded_independently_and_rows_need_not_sum_to_one():
    attention = np.full((2, 6), 0.02)
    attention[0, 0] = 0.9
    attention[1, 5] = 0.9
    attention[1] *= 0.25  # a head that gives most of its attention to the CLS token itself
    masks = attention_masks(attention, (2, 3), keep_mass=0.6)
    assert [np.flatnonzero(m).tolist() for m in masks] == [[0], [5]]


@pytest.mark.parametrize("seed, heads, grid, keep_mass", [
    (0, 6, (14, 14), 0.6), (1, 3, (5, 9), 0.6), (2, 2, (8, 3), 0.3), (3, 12, (30, 40), 0.9),
])
def test_masks_equal_the_published_torch_rule_on_softmax_attention(seed, heads, grid, keep_mass):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(heads, grid[0] * grid[1] + 1))
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    attention = softmax[:, 1:]  # CLS→patch attention: without the CLS→CLS entry, rows sum below 1
    np.testing.assert_array_equal(attention_masks(attention, grid, keep_mass),
                                  published_rule(attention, grid, keep_mass))


@pytest.mark.parametrize("keep_mass", [0.0, -0.1, 1.01])
def test_keep_mass_outside_zero_to_one_is_rejected(keep_mass):
    with pytest.raises(ValueError, match="keep_mass"):
        attention_masks(np.ones((1, 4)), (2, 2), keep_mass)


def test_attention_that_does_not_fit_the_grid_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        attention_masks(np.ones((2, 12)), (3, 5))


# foreground_mask: combining heads ---------------------------------------------------------------

# head 0 keeps patches 1 and 0, head 1 keeps 3 and 0; their mean [.575, .175, .05, .2] keeps 0 and 3
TWO_HEADS = np.array([[0.6, 0.3, 0.05, 0.05], [0.55, 0.05, 0.05, 0.35]])


def test_mean_method_thresholds_the_mean_attention_of_the_heads():
    mask = foreground_mask(TWO_HEADS, (2, 2), keep_mass=0.7)
    assert mask.shape == (2, 2) and mask.ravel().tolist() == [True, False, False, True]


def test_union_method_keeps_every_patch_some_head_keeps():
    mask = foreground_mask(TWO_HEADS, (2, 2), keep_mass=0.7, method="union")
    assert mask.ravel().tolist() == [True, True, False, True]


def test_default_method_is_mean():
    np.testing.assert_array_equal(foreground_mask(TWO_HEADS, (2, 2), keep_mass=0.7),
                                  foreground_mask(TWO_HEADS, (2, 2), keep_mass=0.7, method="mean"))


def test_head_method_is_the_named_heads_own_mask():
    assert foreground_mask(TWO_HEADS, (2, 2), keep_mass=0.7, method="head", head=0).ravel().tolist() == [
        True, True, False, False]
    assert foreground_mask(TWO_HEADS, (2, 2), keep_mass=0.7, method="head", head=1).ravel().tolist() == [
        True, False, False, True]


@pytest.mark.parametrize("head", [-1, 2])
def test_a_head_the_model_does_not_have_is_rejected(head):
    with pytest.raises(ValueError, match="head must be between 0 and 1"):
        foreground_mask(TWO_HEADS, (2, 2), method="head", head=head)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        foreground_mask(TWO_HEADS, (2, 2), method="best")


# tokencut_mask: TokenCut's normalised cut --------------------------------------------------------

def published_ncut(tokens: np.ndarray, grid: tuple[int, int], tau: float = 0.2, eps: float = 1e-5) -> np.ndarray:
    """TokenCut's ``ncut`` + ``detect_box`` mask, with NumPy's general eigensolver on D⁻¹(D − W) in place
    of SciPy's ``eigh(D - W, D)`` and a flood fill by repeated 4-neighbour dilation for ``ndimage.label``."""
    unit = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    affinity = (unit @ unit.T > tau).astype(np.float64)
    affinity[affinity == 0] = eps
    degrees = affinity.sum(axis=1)
    values, vectors = np.linalg.eig((np.diag(degrees) - affinity) / degrees[:, None])
    second = np.real(vectors[:, np.argsort(np.real(values))[1]])
    bipartition = second > second.mean()
    seed = np.argmax(np.abs(second))
    if not bipartition[seed]:
        bipartition = ~bipartition
    side = bipartition.reshape(grid)
    component = np.zeros(grid, dtype=bool)
    component[np.unravel_index(seed, grid)] = True
    while True:
        grown = component.copy()
        grown[1:] |= component[:-1]
        grown[:-1] |= component[1:]
        grown[:, 1:] |= component[:, :-1]
        grown[:, :-1] |= component[:, 1:]
        grown &= side
        if (grown == component).all():
            return component
        component = grown


def two_cluster_tokens(object_mask: np.ndarray, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """Patch tokens ``(h*w, 16)``: one direction on the object, an orthogonal one elsewhere, plus noise."""
    rng = np.random.default_rng(seed)
    tokens = np.where(object_mask.reshape(-1, 1), np.eye(16)[0], np.eye(16)[1])
    return tokens + noise * rng.normal(size=tokens.shape)


def test_the_cut_separates_two_clusters_of_tokens_and_keeps_the_object():
    obj = np.zeros((6, 8), dtype=bool)
    obj[1:4, 4:7] = True
    mask = tokencut_mask(two_cluster_tokens(obj), (6, 8))
    assert mask.shape == (6, 8) and mask.dtype == bool
    np.testing.assert_array_equal(mask, obj)


def test_the_foreground_is_the_side_of_the_most_salient_patch_the_smaller_cluster():
    # Two cliques of sizes a and b: x is constant on each and D-orthogonal to 1, so a²·x_a = −b²·x_b and
    # the smaller clique holds the largest |x|; it is the foreground even where it is the "background".
    small = np.zeros((6, 8), dtype=bool)
    small[0:2, 0:2] = True
    np.testing.assert_array_equal(tokencut_mask(two_cluster_tokens(small), (6, 8)), small)
    np.testing.assert_array_equal(tokencut_mask(two_cluster_tokens(~small), (6, 8)), small)


def test_the_foreground_is_cut_down_to_the_component_of_the_salient_patch():
    obj = np.zeros((8, 10), dtype=bool)
    obj[1:3, 1:3] = True  # two separate blocks of the same cluster
    obj[4:7, 5:8] = True
    tokens = two_cluster_tokens(obj, noise=0.0)
    mask = tokencut_mask(tokens, (8, 10))
    left, right = np.zeros_like(obj), np.zeros_like(obj)
    left[1:3, 1:3], right[4:7, 5:8] = True, True
    assert (mask == left).all() or (mask == right).all()


def test_patches_touching_at_a_corner_are_not_connected():
    mask = np.array([[1, 1, 0, 0],
                     [1, 1, 0, 0],
                     [0, 0, 1, 1],
                     [0, 1, 1, 0]], dtype=bool)
    assert np.flatnonzero(connected_component(mask, (3, 2))).tolist() == [10, 11, 13, 14]
    assert np.flatnonzero(connected_component(mask, (0, 0))).tolist() == [0, 1, 4, 5]
    assert not connected_component(mask, (0, 3)).any()  # a seed outside the mask


@pytest.mark.parametrize("seed, grid", [(0, (5, 7)), (1, (9, 6)), (2, (12, 12))])
def test_tokencut_equals_the_published_procedure_on_noisy_clustered_tokens(seed, grid):
    rng = np.random.default_rng(seed)
    h, w = grid
    rows, cols = np.mgrid[0:h, 0:w]
    regions = ((rows * 2 // h) * 2 + cols * 2 // w).ravel()  # four quadrants, one feature cluster each
    tokens = rng.normal(size=(4, 24))[regions] + 0.6 * rng.normal(size=(h * w, 24))
    np.testing.assert_array_equal(tokencut_mask(tokens, grid), published_ncut(tokens, grid))


def test_second_eigenvector_is_the_full_eigensolvers():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8))
    weights = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 8)
    inv_sqrt = 1 / np.sqrt(weights.sum(axis=1))
    normalised = weights * inv_sqrt[:, None] * inv_sqrt[None, :]
    values, vectors = np.linalg.eigh(normalised)
    trivial = vectors[:, -1] * np.sign(vectors[0, -1])
    np.testing.assert_allclose(trivial, 1 / inv_sqrt / np.linalg.norm(1 / inv_sqrt), atol=1e-10)
    got = second_eigenvector(normalised.astype(np.float32), trivial)
    assert abs(got @ vectors[:, -2]) == pytest.approx(1, abs=1e-6)


def test_tokencut_rejects_tokens_that_do_not_fit_the_grid_and_grids_over_the_limit():
    with pytest.raises(ValueError, match="do not fit"):
        tokencut_mask(np.ones((11, 4)), (3, 4))
    with pytest.raises(ValueError, match="at most"):
        tokencut_mask(np.ones((MAX_GRAPH_PATCHES + 1, 2)), (MAX_GRAPH_PATCHES + 1, 1))


def test_a_single_patch_is_its_own_foreground():
    assert tokencut_mask(np.ones((1, 4)), (1, 1)).tolist() == [[True]]


# geometry ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("image, size, patch, expected", [
    ((640, 480), 480, 16, (640, 480)),
    ((1000, 750), 480, 16, (640, 480)),
    ((300, 500), 480, 16, (480, 800)),
    ((500, 333), 230, 16, (336, 224)),  # resized to 345x230, both sides rounded down to 16
    ((20, 20), 480, 8, (480, 480)),     # small photos are enlarged, as DINO's Resize does
    ((4000, 500), 480, 16, (2048, 256)),  # the long side is held at MAX_SIDE
])
def test_model_input_has_the_shorter_side_at_size_and_sides_rounded_down_to_the_patch(
        image, size, patch, expected):
    assert model_input_size(*image, size, patch) == expected


@pytest.mark.parametrize("size", [8, MAX_SIZE + 1])
def test_size_outside_the_patch_to_max_range_is_rejected(size):
    with pytest.raises(ValueError, match="size must be"):
        model_input_size(640, 480, size, 16)


def test_an_image_too_elongated_for_one_row_of_patches_is_rejected():
    with pytest.raises(ValueError, match="too elongated"):
        model_input_size(MAX_SIDE * 20, 10, 480, 16)


def test_segmentation_input_is_the_bicubic_resize_normalised_with_the_card_mean_and_std():
    img = make_sample(3, size=(90, 60)).image
    spec = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    pixels = segmentation_input(img, (48, 32), spec)
    resized = np.asarray(img.resize((48, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    assert pixels.shape == (3, 32, 48) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, (resized.transpose(2, 0, 1) - 0.5) / 0.25, atol=1e-6)


def test_a_patch_in_the_top_right_of_the_grid_lands_in_the_top_right_of_the_photo():
    grid = np.zeros((3, 4), dtype=bool)
    grid[0, 3] = True
    expected = np.zeros((150, 200), dtype=bool)
    expected[:50, 150:] = True  # each patch covers 50x50 pixels of a 200x150 photo
    np.testing.assert_array_equal(grid_to_image(grid, (200, 150)), expected)


def test_patches_map_to_the_pixels_whose_centres_they_cover_on_a_photo_of_any_size():
    grid = np.zeros((3, 4), dtype=bool)
    grid[2, 0] = True  # bottom left
    mask = grid_to_image(grid, (203, 151))
    rows, cols = np.arange(151), np.arange(203)
    in_row = np.floor((rows + 0.5) * 3 / 151) == 2
    in_col = np.floor((cols + 0.5) * 4 / 203) == 0
    np.testing.assert_array_equal(mask, in_row[:, None] & in_col[None, :])


def bounding_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([rows.min(), rows.max(), cols.min(), cols.max()])


@pytest.mark.parametrize("index", range(6))
def test_a_known_object_lands_where_it_is_after_the_trip_to_the_grid_and_back(index):
    sample = make_sample(index, size=(300, 200))
    grid = np.asarray(Image.fromarray(sample.mask.astype(np.uint8) * 255)
                      .resize((30, 20), Image.Resampling.BOX)) > 127  # 10x10-pixel patches
    restored = grid_to_image(grid, (300, 200))
    assert np.abs(bounding_box(restored) - bounding_box(sample.mask)).max() <= 10


# encodings -------------------------------------------------------------------------------------

def test_rle_runs_are_column_major_and_start_with_zeros():
    mask = np.array([[0, 1, 1], [0, 0, 1]], dtype=bool)
    assert encode_rle(mask) == {"size": [2, 3], "counts": [2, 1, 1, 2]}
    assert encode_rle(np.ones((2, 2), dtype=bool)) == {"size": [2, 2], "counts": [0, 4]}
    assert encode_rle(np.zeros((3, 2), dtype=bool)) == {"size": [3, 2], "counts": [6]}


@pytest.mark.parametrize("seed", range(4))
def test_rle_decodes_back_to_the_mask(seed):
    mask = make_sample(seed, size=(37, 23)).mask
    rle = encode_rle(mask)
    assert sum(rle["counts"]) == mask.size
    np.testing.assert_array_equal(decode_rle(rle), mask)


def test_heatmaps_are_one_picture_per_head_at_the_photo_size_scaled_to_the_head_maximum():
    attention = np.array([[0.1, 0.2, 0.4, 0.2, 0.1, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.25]])
    maps = heatmap_images(attention, (2, 3), (90, 40))
    assert [m.size for m in maps] == [(90, 40), (90, 40)] and maps[0].mode == "L"
    assert np.asarray(maps[0])[0].tolist() == [64] * 30 + [128] * 30 + [255] * 30
    assert np.asarray(maps[1])[39].tolist() == [0] * 60 + [128] * 30


def test_overlay_draws_the_mask_contour_over_the_photo_and_keeps_its_size():
    img = Image.new("RGB", (60, 40), (0, 0, 255))
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:30, 20:40] = True
    out = np.asarray(overlay_image(img, np.zeros((2, 3)), mask))
    assert out.shape == (40, 60, 3)
    assert out[10, 25].tolist() == [255, 255, 0] and out[20, 20].tolist() == [255, 255, 0]  # contour
    assert out[20, 30].tolist() == [0, 0, 255] and out[0, 0].tolist() == [0, 0, 255]  # no heat: the photo


def test_overlay_tints_the_photo_where_the_attention_is():
    img = Image.new("RGB", (40, 40), (0, 0, 200))
    out = np.asarray(overlay_image(img, np.array([[1.0, 0.0], [0.0, 0.0]]), np.zeros((40, 40), dtype=bool)))
    assert out[0, 0, 0] > 100 and out[39, 39].tolist() == [0, 0, 200]


def test_render_outputs_returns_only_what_is_asked_for():
    img = make_sample(0, size=(64, 48)).image
    attention = np.random.default_rng(0).random((2, 12))
    assert set(render_outputs(img, attention, (3, 4), 0.6, "mean", ["rle"])) == {"rle"}
    everything = render_outputs(img, attention, (3, 4), 0.6, "mean",
                                ["mask_png", "rle", "grid", "heads", "overlay"])
    assert set(everything) == {"mask_png", "rle", "grid_mask", "grid_masks", "heads_png", "overlay_png"}
    np.testing.assert_array_equal(png_array(everything["mask_png"]) > 0, decode_rle(everything["rle"]))
    np.testing.assert_array_equal(np.array(everything["grid_masks"], dtype=bool),
                                  attention_masks(attention, (3, 4), 0.6))
    with pytest.raises(ValueError, match="unknown outputs"):
        render_outputs(img, attention, (3, 4), 0.6, "mean", ["contours"])


# POST /v1/segment through `dinoserve serve` ----------------------------------------------------

def encoded(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def test_segment_returns_masks_at_the_size_of_a_non_square_photo(server):
    width, height = 320, 200
    image = encoded(make_sample(7, size=(width, height)).image)
    payload = {"image": {"data": base64.b64encode(image).decode()}, "outputs": ["mask_png", "rle", "grid"]}
    response = httpx.post(f"{server.url}/v1/segment", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    # shorter side 200 → 480 (the card's size), long side int(480 * 320 / 200) = 768; patch 16
    assert (body["width"], body["height"]) == (width, height)
    assert body["input_size"] == [768, 480] and body["grid"] == [30, 48]
    assert body["heads"] == 2 and body["keep_mass"] == 0.6 and body["method"] == "mean"
    mask = png_array(body["mask_png"])
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(decode_rle(body["rle"]), mask > 0)
    grid_mask = np.array(body["grid_mask"], dtype=bool)
    assert grid_mask.shape == (30, 48) and np.array(body["grid_masks"]).shape == (2, 30, 48)
    np.testing.assert_array_equal(grid_to_image(grid_mask, (width, height)), mask > 0)


def test_segment_takes_multipart_with_form_options_and_applies_exif_orientation(server):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 200 wide, 120 high; displayed rotated a quarter turn: 120 x 200
    image = encoded(make_sample(8, size=(200, 120)).image, "JPEG", exif=exif)
    response = httpx.post(f"{server.url}/v1/segment", timeout=60,
                          files={"image": ("photo.jpg", image, "image/jpeg")},
                          data={"size": "224", "keep_mass": "0.5", "method": "union",
                                "outputs": "mask_png, heads,overlay"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (120, 200)
    assert body["input_size"] == [224, 368] and body["grid"] == [23, 14]  # 224 x int(224 * 200 / 120)
    assert body["method"] == "union" and body["keep_mass"] == 0.5
    assert png_array(body["mask_png"]).shape == (200, 120)
    assert [png_array(h).shape for h in body["heads_png"]] == [(200, 120)] * 2
    assert png_array(body["overlay_png"]).shape == (200, 120, 3)
    assert "rle" not in body and "grid_mask" not in body


def test_segment_by_tokencut_is_the_cut_of_the_bundles_patch_tokens(server, bundle):
    sample = make_sample(9, size=(160, 96))
    payload = {"image": {"data": base64.b64encode(encoded(sample.image)).decode()}, "method": "tokencut",
               "size": 160, "outputs": ["mask_png", "grid"]}
    response = httpx.post(f"{server.url}/v1/segment", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "tokencut" and body["input_size"] == [256, 160] and body["grid"] == [10, 16]
    card = ModelCard.load(bundle)
    pixels = segmentation_input(sample.image, (256, 160), card.preprocess)[None]
    session = ort.InferenceSession(str(bundle / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (tokens,) = session.run(["patch_tokens"], {"pixel_values": pixels})
    expected = tokencut_mask(tokens[0], (10, 16))
    grid_mask = np.array(body["grid_mask"], dtype=bool)
    assert expected.any() and (grid_mask != expected).sum() <= 1  # Triton's onnxruntime build may round apart
    np.testing.assert_array_equal(png_array(body["mask_png"]) > 0, grid_to_image(grid_mask, (160, 96)))


def test_segment_by_one_head_returns_that_heads_mask(server):
    image = base64.b64encode(encoded(make_sample(10, size=(96, 64)).image)).decode()
    response = httpx.post(f"{server.url}/v1/segment", timeout=60, json={
        "image": {"data": image}, "method": "head", "head": 1, "size": 64, "outputs": ["grid"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "head" and body["head"] == 1
    assert body["grid_mask"] == body["grid_masks"][1] and body["grid_masks"][0] != body["grid_masks"][1]


@pytest.mark.parametrize("send, status, code", [
    (dict(json={"keep_mass": 0}), 422, "validation_error"),
    (dict(json={"method": "head", "head": 2}), 422, "validation_error"),  # the tiny model has 2 heads
    (dict(json={"head": -1}), 422, "validation_error"),
    # 200x100 at size 1024: a 2048x1024 input, 64x128 patches, over the graph method's limit
    (dict(json={"method": "tokencut", "size": 1024, "image": {"data": base64.b64encode(
        encoded(make_sample(1, size=(200, 100)).image)).decode()}}), 422, "validation_error"),
    (dict(json={"keep_mass": 1.5}), 422, "validation_error"),
    (dict(json={"method": "best"}), 422, "validation_error"),
    (dict(json={"outputs": ["contours"]}), 422, "validation_error"),
    (dict(json={"size": 2000}), 422, "validation_error"),
    (dict(json={"image": {"data": "***"}}), 400, "invalid_base64"),
    (dict(json={"image": {"data": base64.b64encode(b"not an image").decode()}}), 415, "unsupported_media_type"),
    (dict(files=[("images", ("a.png", b"x", "image/png")), ("images", ("b.png", b"y", "image/png"))]),
     422, "validation_error"),
    (dict(files={"image": ("a.png", encoded(Image.new("1", (8000, 6000))), "image/png")}),
     413, "payload_too_large"),
])
def test_bad_segment_requests_get_json_errors_with_the_right_status(server, send, status, code):
    if "json" in send:
        image = base64.b64encode(encoded(make_sample(1, size=(64, 48)).image)).decode()
        send = {"json": {"image": {"data": image}, **send["json"]}}
    response = httpx.post(f"{server.url}/v1/segment", timeout=60, **send)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
