"""Datasets without torch: synthetic labelled shapes with masks, and image folders."""

from core.synthetic import (
    BACKGROUND_GROUPS,
    BACKGROUND_KINDS,
    BACKGROUNDS,
    CLASS_GROUPS,
    CLASSES,
    MIN_SIDE,
    SHAPES,
    UNSEEN_CLASSES,
    SyntheticSample,
    SyntheticShapes,
    make_sample,
    mask_root,
    parse_backgrounds,
    parse_classes,
    parse_size,
    write_dataset,
)

from .folder import (
    IMAGE_EXTENSIONS,
    SYNTHETIC_SPEC_FORMAT,
    ImageFolder,
    load_image,
    open_dataset,
)

__all__ = [
    "BACKGROUND_GROUPS",
    "BACKGROUND_KINDS",
    "BACKGROUNDS",
    "CLASS_GROUPS",
    "CLASSES",
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "SHAPES",
    "UNSEEN_CLASSES",
    "SYNTHETIC_SPEC_FORMAT",
    "ImageFolder",
    "SyntheticSample",
    "SyntheticShapes",
    "load_image",
    "make_sample",
    "mask_root",
    "open_dataset",
    "parse_backgrounds",
    "parse_classes",
    "parse_size",
    "write_dataset",
]
