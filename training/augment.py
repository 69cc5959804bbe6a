"""DINO multi-crop augmentation (official ``DataAugmentationDINO`` in ``main_dino.py``).

Two global crops (the second one also solarised) and ``local_crops_number`` small crops, each with
flips, colour jitter, grayscale and Gaussian blur of view-dependent strength.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageFilter
from torchvision import transforms as T

from core.model_card import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    color_jitter: float = 1.0  # strength multiplier of DINO's jitter (brightness/contrast 0.4, saturation 0.2, hue 0.1)
    grayscale_p: float = 0.2


class RandomGaussianBlur:
    """With probability ``p``, PIL Gaussian blur of radius uniform in [0.1, 2] (official ``utils.GaussianBlur``;
    Pillow's filter is also several times faster than a tensor convolution)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class MultiCropAugmentation:
    """PIL image → list of ``2 + local_crops_number`` normalised tensors (global crops first)."""

    def __init__(self, cfg: MultiCropConfig):
        self.cfg = cfg
        j = cfg.color_jitter
        flip_and_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4 * j, contrast=0.4 * j, saturation=0.2 * j,
                                         hue=min(0.1 * j, 0.5))], p=0.8),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = T.InterpolationMode.BICUBIC

        def global_crop():
            return T.RandomResizedCrop(cfg.global_size, scale=cfg.global_scale, interpolation=bicubic)

        self.global1 = T.Compose([global_crop(), flip_and_jitter, RandomGaussianBlur(1.0), normalize])
        self.global2 = T.Compose(
            [global_crop(), flip_and_jitter, RandomGaussianBlur(0.1), T.RandomSolarize(128, p=0.2), normalize]
        )
        self.local = T.Compose([
            T.RandomResizedCrop(cfg.local_size, scale=cfg.local_scale, interpolation=bicubic),
            flip_and_jitter,
            RandomGaussianBlur(0.5),
            normalize,
        ])

    @property
    def ncrops(self) -> int:
        return 2 + self.cfg.local_crops_number

    def __call__(self, image: Image.Image):
        image = image.convert("RGB")
        crops = [self.global1(image), self.global2(image)]
        crops.extend(self.local(image) for _ in range(self.cfg.local_crops_number))
        return crops
