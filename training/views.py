"""The training data pipeline: which images each step sees, their crops and (iBOT) their masks.

Every sample's randomness is a function of ``(seed, epoch, index)`` alone, not of the worker processes
or of how many epochs this process has already run, so a resumed run sees exactly the crops the
uninterrupted run would have seen: the next step's loss is the same.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from core.synthetic import ShapeCurriculum

from .augment import MultiCropAugmentation
from .masking import BlockMaskGenerator


AUGMENTATION_STREAM, MASK_STREAM = 0, 1


def sample_seed(seed: int, epoch: int, index: int, stream: int = AUGMENTATION_STREAM) -> int:
    """The seed of one sample's random stream: the augmentation's, or (``MASK_STREAM``) the iBOT masks',
    drawn independently of each other (the official loader draws masks from its own calls)."""
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1)[0])


class EpochShardSampler(Sampler):
    """Yields ``(epoch, index)`` for this rank's share of a permutation drawn from ``seed + epoch``.

    Like ``DistributedSampler(shuffle=True, drop_last=True)``: every rank gets ``len(dataset) //
    world_size`` distinct indices per epoch; call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: len(self) * self.world_size]
        return iter([(self.epoch, int(i)) for i in order[self.rank::self.world_size]])


class TrainingViews(Dataset):
    """``(epoch, index)`` → the multi-crop views of image ``index`` and, for iBOT, a mask per global crop.
    A :class:`~core.synthetic.ShapeCurriculum` dataset gives each epoch its own images.

    Items are ``(crops, masks)``: ``crops`` a list of tensors (global crops first), ``masks`` a bool tensor
    ``(2, h, w)`` on the global crops' patch grid (all False before ``pred_start_epoch``), or an empty
    tensor without masking.
    """

    def __init__(
        self,
        dataset,
        augmentation: MultiCropAugmentation,
        seed: int,
        masks: BlockMaskGenerator | None = None,
        mask_grid: int = 0,
        pred_start_epoch: int = 0,
    ):
        self.dataset, self.augmentation, self.seed = dataset, augmentation, seed
        self.masks, self.mask_grid, self.pred_start_epoch = masks, mask_grid, pred_start_epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if isinstance(self.dataset, ShapeCurriculum):
            image = self.dataset.sample(epoch, index).image
        else:
            image, _ = self.dataset[index]
        seed = sample_seed(self.seed, epoch, index)
        # The augmentations draw from the global ``random`` and torch generators: seed them for this
        # sample and put them back, so the caller's streams are untouched.
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            crops = self.augmentation(image)
        random.setstate(py_state)
        if self.masks is None:
            return crops, torch.empty(0, dtype=torch.bool)
        g = self.mask_grid
        if epoch < self.pred_start_epoch:
            return crops, torch.zeros(2, g, g, dtype=torch.bool)
        rng = random.Random(sample_seed(self.seed, epoch, index, MASK_STREAM))
        return crops, torch.from_numpy(np.stack([self.masks(g, g, rng) for _ in range(2)]))
