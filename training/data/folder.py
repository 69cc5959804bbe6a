"""Images from a plain folder, labelled by class sub-folder when there are any."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable
from typing import IO, Any

from PIL import Image, ImageOps

from core.synthetic import BACKGROUND_GROUPS, BACKGROUND_KINDS, BACKGROUNDS, CLASS_GROUPS, CLASSES, SyntheticShapes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

SYNTHETIC_SPEC_FORMAT = (
    "synthetic:N[:SIZE[:SEED[:BACKGROUNDS[:CLASSES]]]] with SIZE an int or WIDTHxHEIGHT, BACKGROUNDS kinds "
    f"({', '.join(BACKGROUND_KINDS)}) or groups ({', '.join(BACKGROUND_GROUPS)}) joined by + (default "
    f"{'+'.join(BACKGROUNDS)}) and CLASSES shapes or groups ({', '.join(CLASS_GROUPS)}) joined by + (default "
    f"seen: {'+'.join(CLASSES)})")
_SYNTHETIC_SPEC = re.compile(
    r"synthetic:(\d+)(?::(\d+)(?:x(\d+))?(?::(\d+)(?::([a-z+]+)(?::([a-z+]+))?)?)?)?")


def load_image(source: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """Open an image file as RGB, upright according to its EXIF orientation."""
    with Image.open(source) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _images_below(directory: pathlib.Path) -> list[pathlib.Path]:
    """Image files anywhere below ``directory``, skipping hidden entries, sorted."""
    found = []
    for current, dirs, files in os.walk(directory):
        # Prune in place so that os.walk never descends into .git, .cache etc.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = pathlib.Path(current)
        found.extend(base / f for f in files if not f.startswith(".") and _is_image(base / f))
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


class ImageFolder:
    """Map-style dataset over a folder; items are ``(image, label)``.

    With class sub-folders (images at any depth below them), ``classes`` are
    their sorted names and labels index it; sub-folders without images are
    ignored. With images only, directly in ``root``, ``classes`` is empty and
    every label is -1. Names starting with "." are ignored.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.root = pathlib.Path(root)
        self.transform = transform
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is a file, not a folder of images")
        entries = sorted(e for e in self.root.iterdir() if not e.name.startswith("."))
        loose = [e for e in entries if _is_image(e)]
        by_class = {e.name: _images_below(e) for e in entries if e.is_dir()}
        by_class = {name: images for name, images in by_class.items() if images}
        if by_class and loose:
            raise ValueError(
                f"{self.root} has both images ({loose[0].name}, ...) and class "
                f"sub-folders ({', '.join(by_class)}); move every image into a class "
                "sub-folder, or use a folder with images only"
            )
        if not by_class and not loose:
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.root} or its sub-folders"
            )
        self.classes: tuple[str, ...] = tuple(sorted(by_class))
        self.samples: list[tuple[pathlib.Path, int]] = [(path, -1) for path in loose]
        for label, name in enumerate(self.classes):
            self.samples.extend((path, label) for path in by_class[name])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        image = load_image(path)
        return (self.transform(image) if self.transform else image), label


def open_dataset(
    spec: str | os.PathLike[str],
    transform: Callable[[Image.Image], Any] | None = None,
) -> SyntheticShapes | ImageFolder:
    """``synthetic:N[:SIZE[:SEED[:BACKGROUNDS[:CLASSES]]]]`` gives SyntheticShapes, anything else ImageFolder."""
    if not (isinstance(spec, str) and spec.split(":", 1)[0] == "synthetic"):
        return ImageFolder(spec, transform)
    match = _SYNTHETIC_SPEC.fullmatch(spec)
    if match is None or int(match[1]) == 0:
        raise ValueError(
            f"malformed dataset spec {spec!r}; expected {SYNTHETIC_SPEC_FORMAT}, N >= 1"
        )
    n, width, height, seed, backgrounds, classes = match.groups()
    size: int | tuple[int, int] = 128
    if width is not None:
        size = int(width) if height is None else (int(width), int(height))
    try:
        kinds = BACKGROUNDS if backgrounds is None else tuple(backgrounds.split("+"))
        shapes = CLASSES if classes is None else tuple(classes.split("+"))
        return SyntheticShapes(int(n), size, int(seed or 0), transform, kinds, shapes)
    except ValueError as error:
        raise ValueError(f"bad dataset spec {spec!r}: {error}") from error
