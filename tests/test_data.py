"""Specification tests for training.data: synthetic shapes and image folders."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from core import synthetic
from training.data import (
    BACKGROUND_GROUPS,
    BACKGROUND_KINDS,
    BACKGROUNDS,
    CLASS_GROUPS,
    CLASSES,
    SHAPES,
    UNSEEN_CLASSES,
    ImageFolder,
    SyntheticShapes,
    load_image,
    make_curriculum_sample,
    make_sample,
    mask_root,
    open_dataset,
    write_dataset,
)

N_STATS = 600  # enough for every (class, background) pair and a stable accuracy estimate
STATS_SIZE = 64
N_MIXED = 960  # every shape on every kind of background: 8 x 8 pairs, 15 samples each on average


@pytest.fixture(scope="module")
def samples():
    return [make_sample(i, STATS_SIZE) for i in range(N_STATS)]


@pytest.fixture(scope="module")
def mixed_samples():
    return [make_sample(i, STATS_SIZE, seed=9, backgrounds=BACKGROUND_KINDS, classes=SHAPES) for i in range(N_MIXED)]


def both(samples, mixed_samples):
    """The default stream and the one with every shape and background kind, for the checks that hold for both."""
    return {"default": samples, "every kind and shape": mixed_samples}


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.float32)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in ``mask`` (image border excluded)."""
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (
        mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    )
    return inner


def _nearest_class_mean_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class means on the first half, score the second half."""
    train = np.arange(len(labels)) < len(labels) // 2
    means = np.stack([features[train & (labels == k)].mean(axis=0) for k in range(labels.max() + 1)])
    scale = features[train].std(axis=0)
    distances = (((features[~train, None] - means[None]) / scale) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == labels[~train]).mean())


# --- synthetic generator ------------------------------------------------------


def test_same_arguments_give_identical_bytes():
    a, b = make_sample(7, 96, seed=3), make_sample(7, (96, 96), seed=3)
    assert a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.mask, b.mask)
    assert (a.label, a.class_name, a.background) == (
        b.label,
        b.class_name,
        b.background,
    )


def test_the_default_stream_is_what_it_was_before_the_new_kinds_and_shapes():
    # Digest of the generator's output before the photo / procedural kinds and the unseen shapes existed:
    # every figure measured on the default data (docs, benchmarks, the demo collection) stays valid.
    digest = hashlib.sha256()
    for i in range(12):
        sample = make_sample(i, (48, 40), seed=3)
        digest.update(sample.image.tobytes())
        digest.update(sample.mask.tobytes())
    assert digest.hexdigest() == "17a252796bb43dd2bb3f0ca17705722073e02b9b0ba9588438b5f68f8d66265f"
    explicit = make_sample(5, (48, 40), seed=3, backgrounds="classic", classes="seen")
    assert explicit.image.tobytes() == make_sample(5, (48, 40), seed=3).image.tobytes()


@pytest.mark.parametrize("backgrounds", ["train", "test", "photo", "testphoto", "cells", "waves"])
def test_every_kind_is_deterministic(backgrounds):
    a, b = (make_sample(11, (72, 56), seed=4, backgrounds=backgrounds, classes="all") for _ in range(2))
    assert a.image.tobytes() == b.image.tobytes() and np.array_equal(a.mask, b.mask)
    assert a.background == b.background
    assert make_sample(12, (72, 56), seed=4, backgrounds=backgrounds).image.tobytes() != a.image.tobytes()


def test_class_selections_label_by_index_in_sorted_order():
    assert SHAPES == tuple(sorted(CLASSES + UNSEEN_CLASSES)) and len(SHAPES) == 8
    assert not set(CLASSES) & set(UNSEEN_CLASSES)
    assert CLASS_GROUPS == {"seen": CLASSES, "unseen": UNSEEN_CLASSES, "all": SHAPES}
    for classes, expected in [("unseen", ("arrow", "crescent")), (("star", "arrow"), ("arrow", "star")),
                              (("seen", "crescent"), ("circle", "crescent", "cross", "ring", "square", "star",
                                                      "triangle")), ("all", SHAPES)]:
        dataset = SyntheticShapes(2 * len(expected), size=32, seed=1, classes=classes)
        assert dataset.classes == expected
        for i in range(len(dataset)):
            sample = dataset.sample(i)
            assert (sample.label, sample.class_name) == (i % len(expected), expected[i % len(expected)])
            assert dataset[i][1] == sample.label
    for bad in [(), ("hexagon",), ("seen", "Star")]:
        with pytest.raises(ValueError, match="classes must be a non-empty selection of arrow"):
            make_sample(0, 32, classes=bad)


def test_train_and_test_backgrounds_share_neither_a_kind_nor_a_picture():
    train, test = BACKGROUND_GROUPS["train"], BACKGROUND_GROUPS["test"]
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(BACKGROUND_KINDS)
    assert set(BACKGROUNDS) == set(BACKGROUND_GROUPS["classic"]) <= set(train)
    assert not set(synthetic.PHOTOS["photo"]) & set(synthetic.PHOTOS["testphoto"])
    assert {k for k in train if k in synthetic.PHOTOS} == {"photo"}
    assert {k for k in test if k in synthetic.PHOTOS} == {"testphoto"}


def test_photo_backgrounds_are_crops_of_their_own_set_of_pictures(monkeypatch):
    opened = []
    real = synthetic._photo

    def spy(name):
        opened.append(name)
        return real(name)

    monkeypatch.setattr(synthetic, "_photo", spy)
    seen = {}
    for kind in ("photo", "testphoto"):
        opened.clear()
        kinds = [make_sample(i, (80, 60), seed=2, backgrounds=kind).background for i in range(60)]
        assert kinds == [kind] * 60
        seen[kind] = set(opened)
        assert len(opened) == 60 and seen[kind] <= set(synthetic.PHOTOS[kind])
        assert len(seen[kind]) >= len(synthetic.PHOTOS[kind]) // 2  # drawn from the whole set
    # A crop is a picture: without pixel noise, it has many times the colours of any procedural background.
    monkeypatch.setattr(synthetic, "_PIXEL_NOISE_RANGE", (0.0, 0.0))

    def colours(kind):
        return np.median([len(np.unique(_pixels(s)[~s.mask], axis=0))
                          for s in (make_sample(i, (80, 60), seed=2, backgrounds=kind) for i in range(20))])

    procedural = max(colours(kind) for kind in BACKGROUND_KINDS if kind not in synthetic.PHOTOS)
    assert min(colours("photo"), colours("testphoto")) > 3 * procedural


def test_different_seed_or_index_gives_different_image():
    base = make_sample(7, 64, seed=3).image.tobytes()
    assert make_sample(7, 64, seed=4).image.tobytes() != base
    assert make_sample(7 + len(CLASSES), 64, seed=3).image.tobytes() != base


def test_classes_are_distinct_sorted_and_at_least_six():
    # Sorted so that ImageFolder's labels (sorted folder names) match the generator's.
    assert len(CLASSES) >= 6
    assert list(CLASSES) == sorted(set(CLASSES))


def test_labels_are_balanced_and_consistent():
    dataset = SyntheticShapes(6 * len(CLASSES), size=32, seed=1)
    labels = []
    for i in range(len(dataset)):
        sample = dataset.sample(i)
        assert sample.label == i % len(CLASSES)
        assert sample.class_name == CLASSES[sample.label]
        labels.append(dataset[i][1])
    assert np.bincount(labels).tolist() == [6] * len(CLASSES)


def test_non_square_image_and_mask_shapes():
    sample = make_sample(3, (120, 72))
    assert sample.image.mode == "RGB"
    assert sample.image.size == (120, 72)
    assert sample.mask.dtype == np.bool_
    assert sample.mask.shape == (72, 120)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1,), ValueError),
        ((0, 8), ValueError),
        ((0, (64,)), ValueError),
        ((0, 64, -2), ValueError),
        ((1.5,), TypeError),
    ],
)
def test_invalid_arguments_are_rejected(args, error):
    with pytest.raises(error):
        make_sample(*args)


@pytest.mark.parametrize("stream", ["default", "every kind and shape"])
def test_masks_cover_a_plausible_fraction(samples, mixed_samples, stream):
    fractions = np.array([s.mask.mean() for s in both(samples, mixed_samples)[stream]])
    assert fractions.min() > 0.01
    assert fractions.max() < 0.5


@pytest.mark.parametrize("stream", ["default", "every kind and shape"])
def test_object_colour_differs_clearly_from_background(samples, mixed_samples, stream):
    for s in both(samples, mixed_samples)[stream]:
        pixels = _pixels(s)
        gap = np.linalg.norm(pixels[s.mask].mean(axis=0) - pixels[~s.mask].mean(axis=0))
        assert gap > 40, f"sample {s.class_name} on {s.background}: object blends into background (gap {gap:.1f})"


def _agreement(pixels: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Share of mask-interior / background-interior pixels with the object's colour."""
    close = np.linalg.norm(pixels - np.median(pixels[mask], axis=0), axis=-1) < 25
    return float(close[_erode(mask)].mean()), float(close[_erode(~mask)].mean())


@pytest.mark.parametrize("stream", ["default", "every kind and shape"])
def test_mask_matches_the_drawn_object(samples, mixed_samples, stream):
    chosen = both(samples, mixed_samples)[stream]
    for s in chosen:
        inside, outside = _agreement(_pixels(s), s.mask)
        assert inside > 0.95 and outside < 0.05, (s.class_name, s.background, inside, outside)
    # The check has teeth: a mask shifted by 3 pixels fails it.
    shifted = [_agreement(_pixels(s), np.roll(s.mask, 3, axis=1))[0] for s in chosen]
    assert np.mean(shifted) < 0.9


def test_mask_is_exactly_the_pixels_at_least_half_covered(monkeypatch):
    # On a flat background without noise, each pixel's colour tells how much of
    # it the object covers, so the mask can be checked pixel by pixel.
    flat = np.array([20.0, 40.0, 60.0], dtype=np.float32)
    monkeypatch.setattr(
        synthetic, "_background", lambda rng, w, h, kinds: ("flat", np.tile(flat, (h, w, 1)))
    )
    monkeypatch.setattr(synthetic, "_PIXEL_NOISE_RANGE", (0.0, 0.0))
    for i in range(2 * len(SHAPES)):
        s = make_sample(i, (56, 48), classes="all")
        pixels = _pixels(s)
        colour = np.median(pixels[_erode(s.mask)], axis=0)
        coverage = (pixels - flat) @ (colour - flat) / np.sum((colour - flat) ** 2)
        clear = np.abs(coverage - 0.5) > 0.05  # rounding to uint8 blurs the exact threshold
        assert np.array_equal(s.mask[clear], coverage[clear] > 0.5), s.class_name
        assert ((coverage > 0.05) & (coverage < 0.95)).any(), "edges should be antialiased"


def test_only_rings_have_a_hole_in_the_middle(samples):
    inside = [s for s in samples if not (s.mask[[0, -1]].any() or s.mask[:, [0, -1]].any())]
    assert len(inside) > N_STATS // 2
    for s in inside:
        rows, cols = np.nonzero(s.mask)
        centre = s.mask[(rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2]
        assert centre == (s.class_name != "ring"), s.class_name


def test_every_class_appears_on_every_background(samples, mixed_samples):
    pairs = {(s.class_name, s.background) for s in samples}
    assert pairs == {(c, b) for c in CLASSES for b in BACKGROUNDS}
    pairs = {(s.class_name, s.background) for s in mixed_samples}
    assert pairs == {(c, b) for c in SHAPES for b in BACKGROUND_KINDS}


@pytest.mark.parametrize("stream", ["default", "every kind and shape"])
def test_colour_does_not_reveal_the_class(samples, mixed_samples, stream):
    chosen = both(samples, mixed_samples)[stream]
    labels = np.array([s.label for s in chosen])
    object_rgb = np.array([_pixels(s)[s.mask].mean(axis=0) for s in chosen])
    image_rgb = np.array([_pixels(s).reshape(-1, 3).mean(axis=0) for s in chosen])
    chance = 1 / (labels.max() + 1)
    assert _nearest_class_mean_accuracy(object_rgb, labels) < 2 * chance
    assert _nearest_class_mean_accuracy(image_rgb, labels) < 2 * chance


@pytest.mark.parametrize("stream", ["default", "every kind and shape"])
def test_shape_features_do_reveal_the_class(samples, mixed_samples, stream):
    # Positive control for the classifier above: geometry must be learnable.
    def features(mask):
        rows, cols = np.nonzero(mask)
        box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        edges = (mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()
        return [mask.sum() / box, edges**2 / mask.sum()]

    chosen = both(samples, mixed_samples)[stream]
    labels = np.array([s.label for s in chosen])
    geometry = np.array([features(s.mask) for s in chosen], dtype=np.float64)
    assert _nearest_class_mean_accuracy(geometry, labels) > 0.5


def test_synthetic_dataset_indexing_and_transform():
    dataset = SyntheticShapes(5, size=(40, 24), seed=2, transform=lambda im: im.size)
    assert len(dataset) == 5
    assert dataset.classes == CLASSES
    assert dataset[1] == ((40, 24), 1)
    assert dataset.sample(-1).image.tobytes() == make_sample(4, (40, 24), 2).image.tobytes()
    with pytest.raises(IndexError):
        dataset[5]
    assert len(list(dataset)) == 5
    plain_image, _ = SyntheticShapes(1, size=32)[0]
    assert isinstance(plain_image, Image.Image)


# --- the curriculum of the demo model (issue 20) -------------------------------


def _centre_and_side(mask: np.ndarray) -> tuple[np.ndarray, float]:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5]), float(max(np.ptp(xs), np.ptp(ys)) + 1)


def test_curriculum_starts_with_white_shapes_centred_on_black():
    for i in range(12):
        sample = make_curriculum_sample(i, 64, seed=5, difficulty=0.0, backgrounds="train")
        assert sample.background == "plain" and sample.label == i % 6
        pixels = np.asarray(sample.image, dtype=np.float64)
        assert pixels[sample.mask].mean() > 240 and pixels[~sample.mask].mean() < 15
        centre, side = _centre_and_side(sample.mask)
        # Centred: the disc-like shapes' centroid is the image centre (the triangle's and others' are off it by
        # less than a fifth of their size); 75-85 % of the side across, less for shapes short of their circle.
        assert np.abs(centre - 32).max() < 0.2 * side
        assert 0.5 * 64 < side <= 0.85 * 64 + 2
        if sample.class_name in ("circle", "ring"):
            assert np.abs(centre - 32).max() < 1 and 0.75 * 64 - 2 <= side


def test_curriculum_at_full_difficulty_is_the_generators_range():
    samples = [make_curriculum_sample(i, 64, seed=5, difficulty=1.0, backgrounds="test") for i in range(60)]
    assert {s.background for s in samples} <= set(BACKGROUND_GROUPS["test"])
    circles = [_centre_and_side(s.mask) for s in samples if s.class_name in ("circle", "ring")]
    sides = [side / 64 for _, side in circles]
    offsets = [np.abs(centre - 32).max() / 64 for centre, _ in circles]
    assert min(sides) < 0.4 and max(sides) > 0.6 and max(sides) <= 0.72  # the range 0.25-0.70
    assert max(offsets) > 0.15
    again = make_curriculum_sample(7, 64, seed=5, difficulty=1.0, backgrounds="test")
    assert again.image.tobytes() == samples[7].image.tobytes()
    assert again.image.tobytes() != make_sample(7, 64, seed=5, backgrounds="test").image.tobytes()
    with pytest.raises(ValueError, match=r"difficulty must be in \[0, 1\]"):
        make_curriculum_sample(0, 64, difficulty=1.5)


def test_shape_curriculum_ramps_the_difficulty_and_draws_new_images_every_epoch():
    curriculum = synthetic.ShapeCurriculum(SyntheticShapes(30, size=48, seed=2, backgrounds="train"), ramp_epochs=4)
    assert len(curriculum) == 30
    levels = {epoch: [curriculum.difficulty(epoch, i) for i in range(30)] for epoch in (0, 2, 4, 9)}
    assert set(levels[0]) == {0.0}
    assert max(levels[2]) <= 0.5 and max(levels[2]) > 0.35 and min(levels[2]) < 0.15
    for epoch in (4, 9):
        assert max(levels[epoch]) <= 1.0 and max(levels[epoch]) > 0.7 and min(levels[epoch]) < 0.3
    assert {curriculum.sample(0, i).background for i in range(30)} == {"plain"}
    for i in (0, 13):
        first, later = curriculum.sample(0, i), curriculum.sample(1, i)
        assert first.image.tobytes() != later.image.tobytes()
        assert curriculum.sample(1, i).image.tobytes() == later.image.tobytes()
        expected = make_curriculum_sample(i + 4 * 30, 48, 2, curriculum.difficulty(4, i), "train")
        assert curriculum.sample(4, i).image.tobytes() == expected.image.tobytes()
    with pytest.raises(IndexError):
        curriculum.sample(0, 30)
    with pytest.raises(ValueError, match="ramp_epochs"):
        synthetic.ShapeCurriculum(SyntheticShapes(3, size=48), ramp_epochs=0)


# --- writing and reading folders ------------------------------------------------


def test_write_dataset_round_trips_through_image_folder(tmp_path):
    n, size = 2 * len(CLASSES), 32
    root = write_dataset(tmp_path / "shapes", n, size=size, seed=5)
    assert root == tmp_path / "shapes"
    assert mask_root(root) == (tmp_path / "shapes-masks").resolve()
    folder = ImageFolder(root)
    assert folder.classes == CLASSES
    assert len(folder) == n
    for path, label in folder.samples:
        index = int(path.stem)
        expected = make_sample(index, size, seed=5)
        assert path == root / expected.class_name / f"{index:06d}.png"
        assert label == expected.label
        assert load_image(path).tobytes() == expected.image.tobytes()
        mask = np.asarray(Image.open(mask_root(root) / expected.class_name / path.name))
        assert set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, expected.mask)
    image, label = folder[0]
    assert image.mode == "RGB" and label == 0


def test_write_dataset_of_chosen_shapes_and_backgrounds(tmp_path):
    root = write_dataset(tmp_path / "unseen", 6, size=40, seed=3, progress=False, backgrounds="test",
                         classes="unseen")
    folder = ImageFolder(root)
    assert folder.classes == UNSEEN_CLASSES
    for path, label in folder.samples:
        expected = make_sample(int(path.stem), 40, 3, backgrounds="test", classes="unseen")
        assert (label, path.parent.name) == (expected.label, expected.class_name)
        assert load_image(path).tobytes() == expected.image.tobytes()
        assert expected.background in BACKGROUND_GROUPS["test"]


def test_write_dataset_without_masks_and_refusing_non_empty_root(tmp_path):
    root = write_dataset(tmp_path / "plain", 3, size=16, masks=False, progress=False)
    assert not mask_root(root).exists()
    assert len(ImageFolder(root)) == 3
    with pytest.raises(FileExistsError):
        write_dataset(root, 3, size=16, progress=False)


def _save(path, size=(8, 6), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_unlabelled_folder_ignores_hidden_and_non_image_files(tmp_path):
    for name in ["b.png", "a.JPG", "c.bmp", ".hidden.png"]:
        _save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    _save(tmp_path / ".cache" / "x.png")
    folder = ImageFolder(tmp_path, transform=lambda im: im.mode)
    assert folder.classes == ()
    assert [p.name for p, _ in folder.samples] == ["a.JPG", "b.png", "c.bmp"]
    assert [folder[i] for i in range(len(folder))] == [("RGB", -1)] * 3


def test_labelled_folder_uses_sorted_class_folders(tmp_path):
    _save(tmp_path / "dog" / "2.png")
    _save(tmp_path / "dog" / "nested" / "1.png")
    _save(tmp_path / "cat" / "1.webp")
    _save(tmp_path / "cat" / ".ds.png")
    _save(tmp_path / ".trash" / "1.png")
    (tmp_path / "empty").mkdir()
    folder = ImageFolder(tmp_path)
    assert folder.classes == ("cat", "dog")
    relative = [(p.relative_to(tmp_path).as_posix(), label) for p, label in folder.samples]
    assert relative == [("cat/1.webp", 0), ("dog/2.png", 1), ("dog/nested/1.png", 1)]


def test_load_image_applies_exif_orientation_and_converts_to_rgb(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("L", (40, 20), 128).save(path, exif=exif)
    image = load_image(path)
    assert image.size == (20, 40)
    assert image.mode == "RGB"


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a folder"):
        ImageFolder(tmp_path / "file.png")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(empty)
    mixed = tmp_path / "mixed"
    _save(mixed / "loose.png")
    _save(mixed / "cls" / "a.png")
    with pytest.raises(ValueError, match="class sub-folder"):
        ImageFolder(mixed)


# --- dataset specs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "n", "size", "seed"),
    [
        ("synthetic:10", 10, (128, 128), 0),
        ("synthetic:10:64", 10, (64, 64), 0),
        ("synthetic:3:64x32:7", 3, (64, 32), 7),
    ],
)
def test_open_dataset_parses_synthetic_specs(spec, n, size, seed):
    transform = lambda im: im  # noqa: E731
    dataset = open_dataset(spec, transform=transform)
    assert isinstance(dataset, SyntheticShapes)
    assert (len(dataset), dataset.size, dataset.seed) == (n, size, seed)
    assert dataset.transform is transform


@pytest.mark.parametrize(
    "spec",
    [
        "synthetic",
        "synthetic:",
        "synthetic:abc",
        "synthetic:0",
        "synthetic:-1",
        "synthetic:5:64:1:2",
        "synthetic:5:x32",
        "synthetic:5:8",
        "synthetic:5:64:1:train:",
        "synthetic:5:64:1::seen",
        "synthetic:5:64:1:train:hexagon",
        "synthetic:5:64:1:train:seen:x",
        "synthetic:5:64:1:photos",
    ],
)
def test_open_dataset_rejects_malformed_synthetic_specs(spec):
    with pytest.raises(ValueError, match="spec"):
        open_dataset(spec)


def test_synthetic_spec_can_restrict_the_backgrounds_without_changing_the_default():
    only = open_dataset("synthetic:24:32:3:gradient+checker")
    assert {only.sample(i).background for i in range(24)} == {"gradient", "checker"}
    everything = open_dataset("synthetic:24:32:3:" + "+".join(BACKGROUNDS))
    for i in range(6):  # listing every kind is the default stream, byte for byte
        assert everything.sample(i).image.tobytes() == make_sample(i, 32, 3).image.tobytes()
    for spec in ("synthetic:4:32:0:grass", "synthetic:4:32:0:gradient+"):
        with pytest.raises(ValueError, match="backgrounds must be a non-empty selection of gradient"):
            open_dataset(spec)


@pytest.mark.parametrize(
    ("spec", "backgrounds", "classes"),
    [
        ("synthetic:10:64:3:test:unseen", ("waves", "cells", "testphoto"), ("arrow", "crescent")),
        ("synthetic:10:64:3:train", BACKGROUNDS + ("photo",), CLASSES),
        ("synthetic:10:64:3:checker+photo:star+arrow+seen", ("checker", "photo"), tuple(sorted(CLASSES + ("arrow",)))),
        ("synthetic:10:64:3:classic:all", BACKGROUNDS, SHAPES),
    ],
)
def test_synthetic_spec_chooses_background_kinds_and_shapes(spec, backgrounds, classes):
    dataset = open_dataset(spec)
    assert (dataset.backgrounds, dataset.classes) == (backgrounds, classes)
    sample = dataset.sample(7)
    assert sample.image.tobytes() == make_sample(7, 64, 3, backgrounds, classes).image.tobytes()
    assert sample.background in backgrounds and sample.class_name == classes[7 % len(classes)]


def test_open_dataset_opens_other_specs_as_folders(tmp_path):
    _save(tmp_path / "x.png")
    dataset = open_dataset(str(tmp_path))
    assert isinstance(dataset, ImageFolder) and len(dataset) == 1
    with pytest.raises(FileNotFoundError):
        open_dataset(str(tmp_path / "nope"))


def test_importing_needs_neither_torch_nor_tqdm_nor_scikit_image():
    code = "import sys, training.data; print(sorted({'torch', 'tqdm', 'skimage'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
