"""iBOT's blockwise masks (official ``ImageFolderMask``, BEiT's block masking)."""

import random

import numpy as np
import pytest

from training.masking import BlockMaskGenerator


def _with_masked_neighbour(mask: np.ndarray) -> float:
    """Fraction of masked patches that have a masked 4-neighbour: ~1 for blocks, ~ratio for noise."""
    p = np.pad(mask, 1)
    neighbour = p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return (neighbour & mask).sum() / mask.sum()


def test_masks_reach_the_ratio_without_exceeding_it():
    generator, rng = BlockMaskGenerator((0.3,), (0.0,)), random.Random(0)
    ratios = np.array([generator(14, 14, rng).mean() for _ in range(200)])
    # Each block adds at most the patches still missing, so the ratio is never exceeded ...
    assert ratios.max() <= 0.3
    # ... and blocks keep coming until it is (nearly) reached.
    assert ratios.min() >= 0.25 and ratios.mean() >= 0.28


def test_masked_patches_come_in_blocks_not_scattered():
    generator, rng = BlockMaskGenerator((0.3,), (0.0,)), random.Random(1)
    blocky = np.mean([_with_masked_neighbour(generator(14, 14, rng)) for _ in range(50)])
    noise = np.random.default_rng(0).random((50, 14, 14)) < 0.3
    scattered = np.mean([_with_masked_neighbour(m) for m in noise])
    assert blocky > 0.95 and scattered < 0.8


def test_official_mixed_recipe_leaves_half_the_crops_unmasked():
    # ViT-S/16 recipe: pred_ratio 0 0.3, pred_ratio_var 0 0.2.
    generator, rng = BlockMaskGenerator((0.0, 0.3), (0.0, 0.2)), random.Random(2)
    ratios = np.array([generator(14, 14, rng).mean() for _ in range(400)])
    unmasked = np.mean(ratios == 0)
    assert 0.42 < unmasked < 0.58
    assert ratios.max() <= 0.5  # 0.3 + 0.2


def test_masks_are_a_function_of_the_random_stream():
    generator = BlockMaskGenerator((0.3,), (0.1,))
    a = [generator(8, 12, random.Random(7)) for _ in range(3)]
    b = [generator(8, 12, random.Random(7)) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (8, 12)


@pytest.mark.parametrize("ratio, var", [((0.3,), (0.0, 0.1)), ((0.3,), (0.4,)), ((0.9,), (0.2,))])
def test_invalid_ratios_are_refused(ratio, var):
    with pytest.raises(ValueError):
        BlockMaskGenerator(ratio, var)


def test_training_masks_are_drawn_independently_of_the_augmentation_draws():
    """The masks must not replay the augmentation's random numbers (one stream per purpose): a mask drawn
    from the augmentation's own stream state differs from the one the pipeline gives."""
    from training.views import TrainingViews

    states = []

    def augmentation(image):  # records the augmentation's stream instead of cropping
        states.append(random.getstate())
        return []

    generator = BlockMaskGenerator((0.3,), (0.1,))
    views = TrainingViews([(None, 0)] * 50, augmentation, seed=0, masks=generator, mask_grid=6)
    replays = 0
    for i in range(50):
        masks = views[(0, i)][1].numpy()
        replay = random.Random()
        replay.setstate(states[i])
        replays += np.array_equal(masks, np.stack([generator(6, 6, replay) for _ in range(2)]))
    assert replays == 0
