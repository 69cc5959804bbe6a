"""Deterministic synthetic images of labelled shapes with exact object masks.

Each sample is a pure function of ``(index, size, seed, backgrounds, classes)``: one filled shape (the
class) at a random scale, rotation and position, on a background of one of the allowed kinds, plus mild
pixel noise. Object and background colours are drawn from the same class-independent distribution, so
only the geometry tells the classes apart.

Kinds of background: the four procedural ``BACKGROUNDS`` (gradient, noise, stripes, checker: the
default), two more procedural ones (``waves``, ``cells``), and crops of photographs bundled with
scikit-image, from two disjoint sets of pictures (``photo`` and ``testphoto``). The groups ``train`` and
``test`` split them so that a test set can be drawn on backgrounds no training image had.

Shapes: ``CLASSES`` are the six classes models train on (the default); ``UNSEEN_CLASSES`` are two more,
kept out of training, to ask whether features that learned "shape" tell apart shapes they never saw.
"""

from __future__ import annotations

import math
import operator
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Alphabetical, so that the labels ImageFolder assigns (sorted sub-folder
# names) to a dataset written by write_dataset equal the generator's labels.
CLASSES: tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")
UNSEEN_CLASSES: tuple[str, ...] = ("arrow", "crescent")  # never in a training set: "seen" is the default
SHAPES: tuple[str, ...] = tuple(sorted(CLASSES + UNSEEN_CLASSES))
CLASS_GROUPS: dict[str, tuple[str, ...]] = {"seen": CLASSES, "unseen": UNSEEN_CLASSES, "all": SHAPES}

# The default kinds; every sample drawn from them is what it was before the other kinds existed.
BACKGROUNDS: tuple[str, ...] = ("gradient", "noise", "stripes", "checker")
BACKGROUND_KINDS: tuple[str, ...] = BACKGROUNDS + ("waves", "cells", "photo", "testphoto")
BACKGROUND_GROUPS: dict[str, tuple[str, ...]] = {
    "classic": BACKGROUNDS,
    "train": BACKGROUNDS + ("photo",),
    "test": ("waves", "cells", "testphoto"),  # nothing in common with "train"
}
# scikit-image's bundled pictures (skimage.data), split in two; grey ones are tinted with two random colours.
PHOTOS: dict[str, tuple[str, ...]] = {
    "photo": ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "immunohistochemistry",
              "moon", "rocket"),
    "testphoto": ("clock", "gravel", "hubble_deep_field", "page", "retina", "stereo_motorcycle"),
}

MIN_SIDE = 16  # below this the smallest shapes shrink to a handful of pixels
_SUPERSAMPLE = 4  # per axis; coverage is counted on this finer grid
_SCALE_RANGE = (0.25, 0.70)  # object diameter as a fraction of the shorter side
_RING_INNER_RANGE = (0.45, 0.65)  # ring hole radius / outer radius
_MIN_MEAN_DISTANCE = 60.0  # RGB distance, object colour vs mean background
_MIN_PIXEL_DISTANCE = 40.0  # RGB distance, object colour vs most background pixels
_COLOUR_TRIES = 64
_PIXEL_NOISE_RANGE = (2.0, 6.0)  # std of the added Gaussian noise, in 0..255 units
_PHOTO_CROP_RANGE = (0.3, 1.0)  # side of a photo crop / the largest crop of the image's aspect that fits
_CELL_COUNT_RANGE = (6, 30)  # Voronoi cells of a "cells" background
_WAVE_COUNT = 3  # plane waves summed in a "waves" background
_EASY_SCALE_RANGE = (0.75, 0.85)  # make_curriculum_sample's object diameter at difficulty 0
_CURRICULUM_STREAM = 1  # third entropy word of make_curriculum_sample's generator

Size = int | tuple[int, int]


@dataclass(frozen=True, eq=False)
class SyntheticSample:
    """One generated image; ``mask`` is True on the object's pixels."""

    image: Image.Image
    label: int
    class_name: str
    mask: np.ndarray
    background: str


def parse_size(size: Size | Sequence[int]) -> tuple[int, int]:
    """Return ``(width, height)`` for an int (square) or a (width, height) pair."""
    if isinstance(size, bool):
        raise TypeError(f"size must be an int or a (width, height) pair, not {size!r}")
    if isinstance(size, Sequence):
        if len(size) != 2:
            raise ValueError(f"size must be an int or a (width, height) pair, not {size!r}")
        width, height = (operator.index(v) for v in size)
    else:
        width = height = operator.index(size)
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"image sides must be at least {MIN_SIDE} pixels, got {width}x{height}")
    return width, height


def _regular_polygon(count: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(count) / count
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _outline(class_name: str, ring_inner: float) -> list[tuple[np.ndarray, int]]:
    """Polygons ``(points, inside)`` of a shape with circumradius 1, drawn in order."""
    if class_name == "circle":
        return [(_regular_polygon(180), 1)]
    if class_name == "ring":
        return [(_regular_polygon(180), 1), (_regular_polygon(180, ring_inner), 0)]
    if class_name == "square":
        return [(_regular_polygon(4, phase=math.pi / 4), 1)]
    if class_name == "triangle":
        return [(_regular_polygon(3), 1)]
    if class_name == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [(_regular_polygon(10) * radii[:, None], 1)]
    if class_name == "cross":
        a = 0.3  # half the arm width
        quarter = np.array([(a, -1.0), (a, -a), (1.0, -a)])
        quarter_turn = np.array([[0.0, -1.0], [1.0, 0.0]])
        points = np.concatenate(
            [quarter @ np.linalg.matrix_power(quarter_turn, k).T for k in range(4)]
        )
        return [(points / math.hypot(1, a), 1)]
    if class_name == "arrow":
        shaft, head, neck = 0.22, 0.55, 0.15  # half-widths of shaft and head; x where the head starts
        points = np.array([(-1.0, -shaft), (neck, -shaft), (neck, -head), (1.0, 0.0), (neck, head),
                           (neck, shaft), (-1.0, shaft)])
        return [(points / math.hypot(1, shaft), 1)]
    if class_name == "crescent":
        # A disc less a larger disc shifted sideways; the shift follows the same draw as the ring's hole.
        hole = _regular_polygon(180, 0.85) + np.array([ring_inner, 0.0])
        return [(_regular_polygon(180), 1), (hole, 0)]
    raise ValueError(f"unknown class {class_name!r}")


def _coverage(polygons: list[tuple[np.ndarray, int]], width: int, height: int) -> np.ndarray:
    """Fraction (multiple of 1/16) of each pixel covered by the polygons."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    for points, inside in polygons:
        # PIL puts integer coordinates at sub-pixel centres; shift so that
        # continuous coordinate x maps onto pixel [floor(x), floor(x) + 1).
        fine = points * s - 0.5
        draw.polygon([(float(x), float(y)) for x, y in fine], fill=s * s * inside)
    # Each sub-pixel holds s*s or 0, so the block average is the exact count.
    counts = np.asarray(canvas.reduce(s), dtype=np.float32)
    return counts / (s * s)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cell: float) -> np.ndarray:
    """Blurred uniform noise with features about ``cell`` pixels wide."""
    grid_w = max(2, math.ceil(width / cell) + 1)
    grid_h = max(2, math.ceil(height / cell) + 1)
    grid = Image.fromarray(rng.random((grid_h, grid_w), dtype=np.float32))
    return np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


@lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    """One of scikit-image's bundled pictures (RGB or L), loaded once per process."""
    try:
        import skimage.data
    except ImportError as error:  # an install without the train extra
        raise ImportError("photo backgrounds need scikit-image (pip install 'dinoserve[train]')") from error
    pixels = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":  # (left, right, disparity): the left view
        pixels = pixels[0]
    return Image.fromarray(np.ascontiguousarray(pixels))


def _photo_crop(rng: np.random.Generator, width: int, height: int, names: tuple[str, ...],
                colours: np.ndarray) -> np.ndarray:
    """A random crop of a random picture of ``names`` at the image's aspect, resized to it, maybe mirrored;
    colour pictures get their channels shuffled, grey ones map black..white onto ``colours[0]..colours[1]``."""
    photo = _photo(names[int(rng.integers(len(names)))])
    scale = min(photo.width / width, photo.height / height) * rng.uniform(*_PHOTO_CROP_RANGE)
    crop_w, crop_h = width * scale, height * scale
    left, top = rng.uniform(0, photo.width - crop_w), rng.uniform(0, photo.height - crop_h)
    order, mirror = rng.permutation(3), rng.random() < 0.5
    crop = photo.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    pixels = np.asarray(crop, dtype=np.float32)
    if mirror:
        pixels = pixels[:, ::-1]
    if pixels.ndim == 2:
        return colours[0] + (pixels / 255)[..., None] * (colours[1] - colours[0])
    return np.ascontiguousarray(pixels[..., order])


def _background(rng: np.random.Generator, width: int, height: int,
                kinds: tuple[str, ...]) -> tuple[str, np.ndarray]:
    kind = kinds[int(rng.integers(len(kinds)))]
    colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    period = max(2.0, rng.uniform(0.06, 0.2) * min(width, height))
    if kind in PHOTOS:
        return kind, _photo_crop(rng, width, height, PHOTOS[kind], colours)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = yy * math.cos(angle) - xx * math.sin(angle)
    if kind == "gradient":
        t = u
    elif kind == "stripes":
        t = np.floor(u / period) % 2
    elif kind == "checker":
        t = (np.floor(u / period) + np.floor(v / period)) % 2
    elif kind == "waves":
        # Plane waves of random direction, wavelength (from the stripes' period up to 3x it) and phase.
        t = np.zeros_like(u)
        for _ in range(_WAVE_COUNT):
            direction = rng.uniform(0, 2 * math.pi)
            wavelength = period * rng.uniform(1.0, 3.0)
            t += np.sin(2 * math.pi * (xx * math.cos(direction) + yy * math.sin(direction)) / wavelength
                        + rng.uniform(0, 2 * math.pi))
    elif kind == "cells":
        # Voronoi mosaic: each cell a random level, shaded darker towards its edges.
        count = int(rng.integers(_CELL_COUNT_RANGE[0], _CELL_COUNT_RANGE[1] + 1))
        sites = rng.uniform(0, 1, size=(count, 2)).astype(np.float32) * np.array([width, height], np.float32)
        levels = rng.uniform(0, 1, size=count).astype(np.float32)
        distance = np.hypot(xx[..., None] - sites[:, 0], yy[..., None] - sites[:, 1])
        nearest = np.partition(distance, 1, axis=-1)[..., :2]  # at least 6 sites: nearest two
        edge = np.clip((nearest[..., 1] - nearest[..., 0]) / period, 0, 1)
        t = levels[distance.argmin(axis=-1)] * (0.6 + 0.4 * edge)
    else:
        coarse = _smooth_noise(rng, width, height, rng.uniform(0.12, 0.35) * min(width, height))
        fine = _smooth_noise(rng, width, height, rng.uniform(1.5, 4.0))
        t = 0.65 * coarse + 0.35 * fine
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return kind, colours[0] + t[..., None] * (colours[1] - colours[0])


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A uniform random colour, redrawn until it stands out from the background."""
    step = max(1, int(math.sqrt(background.shape[0] * background.shape[1] / 4096)))
    pixels = background[::step, ::step].reshape(-1, 3)
    mean = background.reshape(-1, 3).mean(axis=0)
    best, best_score = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        to_mean = float(np.linalg.norm(colour - mean))
        to_pixels = float(np.percentile(np.linalg.norm(pixels - colour, axis=1), 5))
        score = min(to_mean / _MIN_MEAN_DISTANCE, to_pixels / _MIN_PIXEL_DISTANCE)
        if score >= 1.0:
            return colour
        if score > best_score:
            best, best_score = colour, score
    return best


def _select(names: Sequence[str] | str, universe: Sequence[str], groups: dict[str, tuple[str, ...]],
            what: str) -> set[str]:
    """The members of ``universe`` a non-empty selection of them and of ``groups`` (each standing for its
    members) names; a ValueError naming ``what`` otherwise."""
    names = (names,) if isinstance(names, str) else tuple(names)
    chosen = {member for name in names for member in groups.get(name, (name,))}
    if set(chosen) - set(universe) or not names:
        raise ValueError(f"{what} must be a non-empty selection of {', '.join(universe)} or the groups "
                         f"{', '.join(groups)}, got {'+'.join(names) or 'none'}")
    return chosen


def parse_backgrounds(backgrounds: Sequence[str] | str) -> tuple[str, ...]:
    """Validate a selection of BACKGROUND_KINDS and BACKGROUND_GROUPS; returns the kinds in BACKGROUND_KINDS
    order."""
    chosen = _select(backgrounds, BACKGROUND_KINDS, BACKGROUND_GROUPS, "backgrounds")
    return tuple(kind for kind in BACKGROUND_KINDS if kind in chosen)


def parse_classes(classes: Sequence[str] | str) -> tuple[str, ...]:
    """Validate a selection of SHAPES and CLASS_GROUPS; returns the shapes sorted, the order of
    ImageFolder's labels."""
    return tuple(sorted(_select(classes, SHAPES, CLASS_GROUPS, "classes")))


def _sample_arguments(index: int, size: Size, seed: int, backgrounds: Sequence[str],
                      classes: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...], int, int, tuple[int, int]]:
    """A sample's arguments checked and parsed: (kinds, shapes, index, seed, (width, height))."""
    kinds = parse_backgrounds(backgrounds)
    shapes = parse_classes(classes)
    index, seed = operator.index(index), operator.index(seed)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got {index} and {seed}")
    return kinds, shapes, index, seed, parse_size(size)


def make_sample(index: int, size: Size = 128, seed: int = 0,
                backgrounds: Sequence[str] = BACKGROUNDS, classes: Sequence[str] = CLASSES) -> SyntheticSample:
    """Generate sample ``index``; its label is ``index % len(classes)``, its class ``classes[label]``.

    ``size`` is an int (square) or ``(width, height)``; ``backgrounds`` are the background kinds (or
    groups) drawn from, the four ``BACKGROUNDS`` by default; ``classes`` the shapes (or groups), sorted,
    ``CLASSES`` by default. The result depends only on ``(index, size, seed, backgrounds, classes)``, byte
    for byte; with the defaults it is the same as before those options existed.
    """
    kinds, shapes, index, seed, (width, height) = _sample_arguments(index, size, seed, backgrounds, classes)
    rng = np.random.default_rng([seed, index])
    label = index % len(shapes)

    kind, background = _background(rng, width, height, kinds)
    colour = _object_colour(rng, background)
    radius = rng.uniform(*_SCALE_RANGE) * min(width, height) / 2
    angle = rng.uniform(0, 2 * math.pi)
    # Every shape fits its circumcircle; letting at most 10% of the radius
    # leave the frame keeps objects "mostly inside" without cutting them up.
    margin = 0.9 * radius
    centre = np.array([rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)])
    # Drawn for every class, so that no later draw depends on the class.
    ring_inner = rng.uniform(*_RING_INNER_RANGE)
    noise_std = rng.uniform(*_PIXEL_NOISE_RANGE)

    return _render(rng, shapes, label, kind, background, colour, radius, angle, centre, ring_inner, noise_std)


def _render(rng: np.random.Generator, shapes: tuple[str, ...], label: int, kind: str, background: np.ndarray,
            colour: np.ndarray, radius: float, angle: float, centre: np.ndarray, ring_inner: float,
            noise_std: float) -> SyntheticSample:
    """Paint shape ``shapes[label]`` onto ``background`` and add the pixel noise (``rng``'s last draw)."""
    width, height = background.shape[1], background.shape[0]
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polygons = [
        (points @ rotation.T * radius + centre, inside)
        for points, inside in _outline(shapes[label], ring_inner)
    ]
    coverage = _coverage(polygons, width, height)
    alpha = coverage[..., None]
    pixels = background * (1 - alpha) + colour * alpha
    pixels += noise_std * rng.standard_normal(size=pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return SyntheticSample(image, label, shapes[label], coverage >= 0.5, kind)


def make_curriculum_sample(index: int, size: Size = 128, seed: int = 0, difficulty: float = 1.0,
                           backgrounds: Sequence[str] = BACKGROUNDS,
                           classes: Sequence[str] = CLASSES) -> SyntheticSample:
    """Sample ``index`` of a curriculum: ``difficulty`` 0 is a white shape on black, centred, 75–85 % of the
    shorter side across; 1 is :func:`make_sample`'s distribution (any size of its range, anywhere, colours
    and backgrounds of ``backgrounds``); in between, the size range and the offset from the centre are
    interpolated and the background is a drawn one (with a drawn object colour) with probability
    ``difficulty``, else black (kind ``"plain"``, white object). Labels as in :func:`make_sample`; a pure
    function of the arguments, drawn from another stream than :func:`make_sample` of the same index.

    A randomly initialised network tells apart the easy images' shapes (k-NN well above chance) and not the
    hard ones'; a self-supervised run that starts easy has a shape signal to sharpen before the backgrounds
    come (docs/training.md, issue 20).
    """
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    kinds, shapes, index, seed, (width, height) = _sample_arguments(index, size, seed, backgrounds, classes)
    rng = np.random.default_rng([seed, index, _CURRICULUM_STREAM])
    label = index % len(shapes)
    low, high = (easy + (hard - easy) * difficulty for easy, hard in zip(_EASY_SCALE_RANGE, _SCALE_RANGE))
    radius = rng.uniform(low, high) * min(width, height) / 2
    angle = rng.uniform(0, 2 * math.pi)
    margin = 0.9 * radius
    middle = np.array([width / 2, height / 2])
    anywhere = np.array([rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)])
    centre = middle + difficulty * (anywhere - middle)
    ring_inner = rng.uniform(*_RING_INNER_RANGE)
    noise_std = rng.uniform(*_PIXEL_NOISE_RANGE)
    if rng.uniform() < difficulty:
        kind, background = _background(rng, width, height, kinds)
        colour = _object_colour(rng, background)
    else:
        kind, background = "plain", np.zeros((height, width, 3), np.float32)
        colour = np.full(3, 255.0, np.float32)
    return _render(rng, shapes, label, kind, background, colour, radius, angle, centre, ring_inner, noise_std)


class SyntheticShapes:
    """Map-style dataset of ``n`` synthetic samples; items are ``(image, label)``, labels index ``classes``."""

    def __init__(
        self,
        n: int,
        size: Size = 128,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        backgrounds: Sequence[str] = BACKGROUNDS,
        classes: Sequence[str] = CLASSES,
    ) -> None:
        self.n = operator.index(n)
        self.backgrounds = parse_backgrounds(backgrounds)
        self.classes: tuple[str, ...] = parse_classes(classes)
        self.seed = operator.index(seed)
        if self.n < 0 or self.seed < 0:
            raise ValueError(f"n and seed must be non-negative, got {self.n} and {self.seed}")
        self.size = parse_size(size)
        self.transform = transform

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> SyntheticSample:
        i = operator.index(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        return make_sample(i, self.size, self.seed, self.backgrounds, self.classes)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        sample = self.sample(i)
        image = self.transform(sample.image) if self.transform else sample.image
        return image, sample.label


class ShapeCurriculum:
    """``shapes``' images as a curriculum over epochs: image ``index`` of epoch ``e`` is
    :func:`make_curriculum_sample` ``index + e * n`` (new images every epoch) at a difficulty drawn
    uniformly from ``[0, min(1, e / ramp_epochs)]``: plain shapes in the first epoch, the generator's whole
    range of difficulty from epoch ``ramp_epochs`` on (with easy images still among them). A pure function of
    ``(shapes, ramp_epochs, epoch, index)``, so a resumed run sees the same images."""

    def __init__(self, shapes: SyntheticShapes, ramp_epochs: int) -> None:
        if ramp_epochs < 1:
            raise ValueError(f"ramp_epochs must be at least 1, got {ramp_epochs}")
        self.shapes, self.ramp_epochs = shapes, ramp_epochs

    def __len__(self) -> int:
        return len(self.shapes)

    def difficulty(self, epoch: int, index: int) -> float:
        ceiling = min(1.0, epoch / self.ramp_epochs)
        return ceiling * float(np.random.default_rng([self.shapes.seed, epoch, index, _CURRICULUM_STREAM]).uniform())

    def sample(self, epoch: int, index: int) -> SyntheticSample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        shapes = self.shapes
        return make_curriculum_sample(index + epoch * len(self), shapes.size, shapes.seed,
                                      self.difficulty(epoch, index), shapes.backgrounds, shapes.classes)


def mask_root(root: str | pathlib.Path) -> pathlib.Path:
    """Directory write_dataset puts masks in: the sibling ``<root>-masks``."""
    resolved = pathlib.Path(root).resolve()
    return resolved.with_name(resolved.name + "-masks")


def write_dataset(
    root: str | pathlib.Path,
    n: int,
    size: Size = 128,
    seed: int = 0,
    masks: bool = True,
    progress: bool = True,
    backgrounds: Sequence[str] = BACKGROUNDS,
    classes: Sequence[str] = CLASSES,
) -> pathlib.Path:
    """Write ``root/<class>/<index:06d>.png`` (and 0/255 masks under mask_root).

    The mask directory is a sibling rather than a sub-folder so that ImageFolder
    does not mistake it for a class. Refuses non-empty target directories, as
    leftovers from an earlier run would silently join the dataset.
    """
    root = pathlib.Path(root)
    dataset = SyntheticShapes(n, size, seed, backgrounds=backgrounds, classes=classes)
    targets = [root] + ([mask_root(root)] if masks else [])
    for target in targets:
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(f"{target} is not empty; remove it or choose another root")
    indices: Any = range(len(dataset))
    if progress:
        # Imported here so that the module itself needs only numpy and Pillow.
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"writing {root}", unit="img")
    for i in indices:
        sample = dataset.sample(i)
        name = f"{i:06d}.png"
        image_dir = root / sample.class_name
        image_dir.mkdir(parents=True, exist_ok=True)
        sample.image.save(image_dir / name)
        if masks:
            mask_dir = mask_root(root) / sample.class_name
            mask_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.mask.astype(np.uint8) * 255).save(mask_dir / name)
    return root
