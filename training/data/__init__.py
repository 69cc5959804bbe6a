"""Datasets without torch: synthetic labelled shapes with masks, and image folders."""

from .folder import (
    IMAGE_EXTENSIONS,
    SYNTHETIC_SPEC_FORMAT,
    ImageFolder,
    load_image,
    open_dataset,
)
from .synthetic import (
    BACKGROUNDS,
    CLASSES,
    MIN_SIDE,
    SyntheticSample,
    SyntheticShapes,
    make_sample,
    mask_root,
    parse_size,
    write_dataset,
)

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "SYNTHETIC_SPEC_FORMAT",
    "ImageFolder",
    "SyntheticSample",
    "SyntheticShapes",
    "load_image",
    "make_sample",
    "mask_root",
    "open_dataset",
    "parse_size",
    "write_dataset",
]
